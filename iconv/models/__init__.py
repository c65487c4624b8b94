"""The models: the exact flow :class:`ConvFlow`, the Glow-style baseline :class:`GlowBaseline`
(both :class:`FlowModel`, hence :class:`iconv.layers.InvertibleModule`), and the Table 1
classifier :class:`ConvNet`. :data:`MODELS` names every class a checkpoint may hold."""
from .classifier import ConvNet
from .flow import ConvFlow, FlowModel
from .glow import GlowBaseline

#: Model classes by name, for self-describing checkpoints (``iconv.load``).
MODELS = {cls.__name__: cls for cls in (ConvFlow, GlowBaseline, ConvNet)}

__all__ = ["MODELS", "ConvFlow", "ConvNet", "FlowModel", "GlowBaseline"]
