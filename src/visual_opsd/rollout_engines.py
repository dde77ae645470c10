"""Rollout engines: what turns a batch of student contexts into completions (`rollout.engine`).

    native  the backend's own sampler (`Backend.sample`): KV-cache decoding on the training weights
            themselves, nothing to sync; the HF backend draws on the model's device
            (`backends.base.sample_on_device`)
    vllm    a vLLM `LLM` inside the training process (colocated), for Hugging Face students: loads
            the student's weights at start, gets them again after every optimizer step

Every engine returns `backends.base.Completion`s, so `rollout.collect_rollout` builds the same
`Rollout` whatever the engine: completion ids, which ids were sampled and which injected (image
skip), whether each ended with end-of-sequence, and per id its log-probability under the sampling
distribution (softmax of logits / temperature without the backend's suppressed ids;
`backends.base.token_logprobs`), NaN at injected ids.

Lifecycle (train.py): `make_rollout_engine` once after the backend is open; `sample` per
micro-batch; `weights_changed` after every applied optimizer step; `sleep` after the step's rollouts
(the training phase); `close` at the end. docs/scale.md, "Rollout engines", says which to choose.

The vLLM engine (`VLLMEngine`):
- **In-process.** `VLLM_ENABLE_V1_MULTIPROCESSING=0` puts vLLM's engine core and its one worker in
  this process, so a weight update is a call, not a transfer to another process; `enforce_eager`
  (no CUDA graphs / compilation to redo when weights change). One process only: vLLM starts its own
  single-rank process group, which a multi-process run's group would collide with (a multi-process
  run needs vLLM's `external_launcher` mode, not done here), so the engine refuses world size > 1.
- **Weights.** At start the student's weights (LoRA: merged into the base weights) are written to a
  temporary folder in the HF layout and vLLM loads them from there. After an optimizer step, the
  next `sample` first pushes the current weights through vLLM's in-place reload
  (`collective_rpc("reload_weights", weights_iterator=...)`, in checkpoint names, so vLLM's own loader
  fuses q/k/v and gate/up as from a checkpoint) and resets vLLM's prefix cache (cached keys and values
  were computed with the old weights). LoRA is pushed merged too, not as a `LoRARequest`: the
  training backend's LoRA targets are regular expressions over HF module names that vLLM's LoRA
  manager does not take one-to-one (it packs q/k/v), and merged weights sample at the base model's
  speed; the price is a full-weight copy per step (a device-to-device copy on a GPU).
- **Image skip: stop-and-continue**, not a logits processor. A round stops on `<image_start>`
  (`stop_token_ids`, the id stays in the output); with skips left, the injected ids are appended
  and the row continues as a new request whose prompt is context + everything so far, which vLLM's
  prefix cache serves without recomputing it. This uses vLLM's public API only and keeps an
  injected id out of the sampler (a forcing logits processor would make it a "sampled" id of
  log-probability 0, and vLLM's logits-processor interface is batch-level and changes between
  versions); the cost is one more scheduling round per skip, which the prefix cache makes cheap.
- **Sampling.** Temperature as configured, no top-k / top-p; rows stop on the backend's
  end-of-sequence id (`ignore_eos` for the model config's own, which may differ); suppressed ids get a
  logit bias of -100 (vLLM's bound: relative probability e^-100, zero in float32);
  `logprobs=0` with `logprobs_mode="processed_logprobs"` returns the sampled id's log-probability
  after temperature and bias, the native engine's definition. One seed per request, drawn from the
  caller's generator: reproducible for this engine (not the native engine's draws).
- **Sleep.** vLLM's sleep mode (weights and KV cache released while training) needs CUDA's memory
  allocator: where the platform has it, `sleep` puts vLLM to sleep (level 2: the weights are
  pushed again anyway) and the next `sample` wakes it; on a CPU `LLM.sleep` is a no-op, so the
  engine does not call it.
- **Models.** Text-only causal LMs (the HF backend's text-only mode) here; vision-language students
  send their problem images with the context ids (`multi_modal_data`), which only a GPU machine
  with torchvision runs (benchmarks/rollout_engines_gpu.py).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from visual_opsd.errors import ConfigError

if TYPE_CHECKING:
    from visual_opsd.backends.base import Backend, Completion, Context

EngineName = Literal["native", "vllm"]
ENGINES: tuple[str, ...] = ("native", "vllm")
_LOGIT_BIAS_FLOOR = -100.0  # vLLM clamps logit biases to [-100, 100]


class RolloutEngine(Protocol):
    """What `collect_rollout` and the training loop need of an engine (module docstring)."""

    name: str

    def sample(
        self,
        contexts: Sequence[Context],
        n: int = 1,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        max_image_skips: int = 1,
        generator: torch.Generator | None = None,
    ) -> list[Completion]:
        """`n` completions per context, context-major (index i * n + j), with image-skip injection."""

    def weights_changed(self) -> None:
        """The student's weights changed (an optimizer step): sample from the new ones next time."""

    def sleep(self) -> None:
        """Training is about to run: release what the engine holds where it can."""

    def close(self) -> None:
        """Free the engine for good."""


class NativeEngine:
    """The backend's own sampler on the training weights: nothing to sync or release."""

    name = "native"

    def __init__(self, backend: Backend):
        self.backend = backend

    def sample(self, contexts, n=1, max_new_tokens=256, temperature=1.0, max_image_skips=1, generator=None):
        return self.backend.sample(list(contexts), n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                   max_image_skips=max_image_skips, generator=generator)

    def weights_changed(self) -> None:
        """Nothing to do: the backend samples from the live weights."""

    def sleep(self) -> None:
        """Nothing to release."""

    def close(self) -> None:
        """Nothing to free."""


def make_rollout_engine(name: str, backend: Backend, *, world: int = 1, gpu_memory_utilization: float = 0.3,
                        cpu_kv_cache_gib: int = 1) -> RolloutEngine:
    """The engine `rollout.engine` names, for `backend` (a ConfigError names what is missing)."""
    if name == "native":
        return NativeEngine(backend)
    if name != "vllm":
        raise ConfigError(f"rollout.engine: {name!r} is not one of {list(ENGINES)}")
    if world > 1:
        raise ConfigError("rollout.engine=vllm runs in one process here (vLLM starts its own process group); "
                          "run without accelerate's multi-process launch, or use rollout.engine=native")
    if not hasattr(backend, "tokenizer") or not hasattr(backend, "text_only"):
        raise ConfigError(f"rollout.engine=vllm needs a Hugging Face backend (backend.kind: hf), got "
                          f"{type(backend).__name__}: use rollout.engine=native")
    return VLLMEngine(backend, gpu_memory_utilization=gpu_memory_utilization, cpu_kv_cache_gib=cpu_kv_cache_gib)


def import_vllm() -> Any:
    """The `vllm` module, or a ConfigError that says how to install it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process (docstring)
    try:
        import vllm
    except Exception as e:  # missing, or installed but unloadable beside this torch
        hint = "pip install 'visual-opsd[vllm]' (CPU; GPU: [vllm-gpu]); `make test-vllm` sets up .venv-vllm"
        raise ConfigError(f"rollout.engine=vllm needs vLLM ({type(e).__name__}: {e}); install: {hint}") from None
    return vllm


class VLLMEngine:
    """A colocated vLLM `LLM` sampling for an HF backend's student (module docstring)."""

    name = "vllm"

    def __init__(self, backend: Backend, *, gpu_memory_utilization: float = 0.3, cpu_kv_cache_gib: int = 1):
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.backend = backend
        self.stale = False  # weights changed since vLLM last got them
        self.asleep = False
        self.can_sleep = bool(current_platform.is_sleep_mode_available())
        if current_platform.is_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))  # GiB of KV cache
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # leave the trainer's threads alone
        self.folder = tempfile.mkdtemp(prefix="visual_opsd_vllm_")
        self._write_weights(self.folder)
        # vLLM reseeds torch's global generator and replaces torch.set_num_threads on a CPU: the
        # training process keeps its own
        rng, threads, set_threads = torch.random.get_rng_state(), torch.get_num_threads(), torch.set_num_threads
        try:
            self.llm = vllm.LLM(
                model=self.folder, dtype=backend.options.dtype, enforce_eager=True, seed=0,
                logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                # ids in, ids out: no tokenizer, but a vision-language model's image processor needs it
                skip_tokenizer_init=backend.text_only,
                max_model_len=self._max_model_len(), gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=self.can_sleep,
            )
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            torch.random.set_rng_state(rng)

    def _max_model_len(self) -> int:
        """Longest sequence vLLM must hold: the backend's `max_length`, else the model's own limit."""
        from visual_opsd.backends.hf import unwrap

        limit = self.backend.options.max_length
        return int(limit or getattr(unwrap(self.backend.model).config, "max_position_embeddings", 4096))

    def _weights(self) -> dict[str, torch.Tensor]:
        """The student's current weights under the base model's names (LoRA merged in)."""
        from visual_opsd.backends.hf import merged_state_dict, unwrap

        if self.backend.lora:
            return merged_state_dict(self.backend.model)
        return {k: v.detach() for k, v in unwrap(self.backend.model).state_dict().items()}

    def _write_weights(self, folder: str) -> None:
        from visual_opsd.backends.hf import unwrap

        unwrap(self.backend.model).save_pretrained(folder, state_dict=self._weights())
        self.backend.processor.save_pretrained(folder)

    # weights and memory ------------------------------------------------------------------------

    def weights_changed(self) -> None:
        self.stale = True

    def sleep(self) -> None:
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=2)  # weights and KV cache released: the weights are pushed again anyway
            self.asleep = True
            self.stale = True

    def _ready(self) -> None:
        """Awake, on the current weights."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        if self.stale:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(self._weights().items()),
                                                              "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()  # its keys and values came from the old weights
            self.stale = False
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def close(self) -> None:
        self.llm = None
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # best effort: the process may be ending anyway
            pass

    # sampling ----------------------------------------------------------------------------------

    def _params(self, max_tokens: int, temperature: float, seed: int) -> Any:
        from vllm import SamplingParams

        b = self.backend
        stops = [i for i in (b.eos_id, b.image_start_id) if i >= 0]  # -1: no such id (LLaVA has no image marker)
        return SamplingParams(
            temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_tokens, seed=seed, logprobs=0,
            # the backend's end-of-sequence (e.g. Qwen's end of turn), not the model config's: the native rule
            ignore_eos=True, stop_token_ids=stops,
            logit_bias={i: _LOGIT_BIAS_FLOOR for i in b.suppressed_ids} or None, detokenize=False,
        )

    def _prompt(self, context: Context, done: list[int]) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt_token_ids": list(context.ids) + done}
        images = getattr(context, "images", None)
        if images:  # a vision-language student: vLLM's processor finds the expanded placeholders
            prompt["multi_modal_data"] = {"image": images}
        return prompt

    def sample(self, contexts, n=1, max_new_tokens=256, temperature=1.0, max_image_skips=1, generator=None):
        """Rounds of vLLM requests, one per unfinished row: a round that stops on `<image_start>`
        with skips left gets the injected ids and goes on as a new request (module docstring)."""
        from visual_opsd.backends.base import Completion

        self._ready()
        b = self.backend
        rows = [c for c in contexts for _ in range(n)]
        budget = []
        for c in rows:
            room = b.completion_room(c)
            budget.append(max(1, max_new_tokens if room is None else min(max_new_tokens, room)))
        ids: list[list[int]] = [[] for _ in rows]
        sampled: list[list[bool]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        skips, finished = [0] * len(rows), [False] * len(rows)
        todo = list(range(len(rows)))
        while todo:
            seeds = torch.randint(2**31 - 1, (len(todo),), generator=generator).tolist()
            params = [self._params(budget[r] - len(ids[r]), temperature, s) for r, s in zip(todo, seeds, strict=True)]
            outs = self.llm.generate([self._prompt(rows[r], ids[r]) for r in todo], params, use_tqdm=False)
            again = []
            for r, out in zip(todo, outs, strict=True):
                comp = out.outputs[0]
                toks = list(comp.token_ids)
                ids[r] += toks
                sampled[r] += [True] * len(toks)
                logprobs[r] += [step[t].logprob for step, t in zip(comp.logprobs, toks, strict=True)]
                last = toks[-1] if toks else None
                if last == b.eos_id:
                    finished[r] = True
                elif last == b.image_start_id and skips[r] < max_image_skips and len(ids[r]) < budget[r]:
                    skips[r] += 1
                    inject = [b.image_end_id][: budget[r] - len(ids[r])]
                    ids[r] += inject
                    sampled[r] += [False] * len(inject)
                    logprobs[r] += [math.nan] * len(inject)
                    if len(ids[r]) < budget[r]:
                        again.append(r)
            todo = again
        return [Completion(ids=ids[r], text=b.decode(ids[r]), sampled=sampled[r], finished=finished[r],
                           image_skips=skips[r], logprobs=logprobs[r]) for r in range(len(rows))]
