"""inhibmoe_fast: a Mixture-of-Experts layer with neural inhibition, with fast kernels.

A learned sigmoid gate suppresses the features that all kinds of input share
before the router picks its top-k experts (Zou and Zhang, "Neural Inhibition
Improves Dynamic Routing and Mixture of Experts", arXiv:2507.03221).
"""

from . import ops, reference, settings
from .config import MoEConfig
from .context import InhibitionContext
from .layer import InhibitedMoE
from .outputs import MoEAux
from .reference import ReferenceMoE

__all__ = ["InhibitedMoE", "ReferenceMoE", "InhibitionContext", "MoEConfig", "MoEAux", "ops", "reference", "settings"]
__version__ = "0.1.0"
