"""The models: the exact flow :class:`ConvFlow`, the Glow-style baseline :class:`GlowBaseline`, the
paper's noise-padded flow :class:`PaperFlow` (a bound, not a likelihood; all three
:class:`FlowModel`, hence :class:`iconv.layers.InvertibleModule`), and the Table 1
classifier :class:`ConvNet`. :data:`MODELS` names every class a checkpoint may hold."""
from .classifier import ConvNet
from .flow import ConvFlow, FlowModel
from .glow import GlowBaseline
from .paper_flow import PaperFlow

#: Model classes by name, for self-describing checkpoints (``iconv.load``).
MODELS = {cls.__name__: cls for cls in (ConvFlow, GlowBaseline, PaperFlow, ConvNet)}

__all__ = ["MODELS", "ConvFlow", "ConvNet", "FlowModel", "GlowBaseline", "PaperFlow"]
