"""crt: the Compact Recurrent Transformer and its baselines, with one explicit-state interface.

model = crt.build_model(ModelConfig(arch="crt", vocab_size=V))
state = model.init_state(batch_size)
logits, state = model(tokens, state)
state = crt.detach(state)
"""

from crt.config import ModelConfig, TrainConfig
from crt.errors import CRTError
from crt.models import build_model
from crt.state import detach, iter_segments, reset_rows

__version__ = "0.1.0"
__all__ = ["CRTError", "ModelConfig", "TrainConfig", "build_model", "detach", "iter_segments", "reset_rows"]
