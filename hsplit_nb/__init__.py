"""hsplit-nb: HSplitLoRA (heterogeneous split LoRA fine-tuning) as a Jupyter-first research package."""
import warnings

# peft 0.21 calls a transformers 5 API that transformers deprecates; the warning is not actionable here
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
