"""loom: a hackable LLM inference engine and efficiency lab.

    from loom import LLM, SamplingParams
    llm = LLM()                      # the default model, SmolLM2-135M-Instruct
    print(llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=64))[0].text)
"""

from loom.config import ModelConfig
from loom.llm import LLM
from loom.outputs import CompletionOutput, RequestOutput, StreamDelta
from loom.sampling_params import SamplingParams
from loom.weights.loader import load_model

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "ModelConfig", "RequestOutput", "CompletionOutput", "StreamDelta", "load_model"]
