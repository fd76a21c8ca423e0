"""Build the configured :class:`~core.llm.base.ChatModel` from :class:`~core.settings.Settings`.

Both production backends serve Qwen2.5 (the Modelfile's model on Ollama, or Qwen2.5 on vLLM), so their
prompts are budgeted with the Qwen tokenizer; the embedded model counts with llama.cpp's own.
"""

from __future__ import annotations

from core.llm.base import ChatModel
from core.settings import Settings
from core.tokens import qwen_token_counter

# The embedded model runs on CPU next to kefu: a bigger window costs memory and prompt time for nothing.
EMBEDDED_MAX_CTX = 8192


def build_model(settings: Settings) -> ChatModel:
    """The backend ``settings.llm_backend`` names, configured from the ``KEFU_*`` settings."""
    if settings.llm_backend == "ollama":
        from core.llm.ollama import OllamaModel

        return OllamaModel(
            host=settings.ollama_host,
            model=settings.ollama_model,
            num_ctx=settings.num_ctx,
            timeout=settings.llm_timeout,
            keep_alive=settings.ollama_keep_alive,
            temperature=settings.temperature,
            max_tokens=settings.max_answer_tokens,
            tokenizer=qwen_token_counter,
        )
    if settings.llm_backend == "openai":
        from core.llm.openai_compat import OpenAICompatModel

        return OpenAICompatModel(
            base_url=settings.openai_base_url,
            model=settings.openai_model,
            api_key=settings.openai_api_key.get_secret_value(),
            timeout=settings.llm_timeout,
            temperature=settings.temperature,
            max_tokens=settings.max_answer_tokens,
            tokenizer=qwen_token_counter,
        )
    # Imported here so kefu runs without llama-cpp-python when another backend is configured.
    from core.llm.llamacpp import LlamaCppModel

    return LlamaCppModel(
        model_path=settings.llamacpp_model_path,
        n_ctx=min(settings.num_ctx, EMBEDDED_MAX_CTX),
        n_threads=settings.llamacpp_threads,
        temperature=settings.temperature,
        max_tokens=settings.max_answer_tokens,
    )
