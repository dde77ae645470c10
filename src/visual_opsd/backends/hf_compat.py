"""The one workaround for a machine without torchvision (CPU torch beside which torchvision cannot load).

transformers 5 builds every video processor on torchvision, and a Qwen-VL processor refuses to be
built without one (it type-checks each sub-processor). Images need no torchvision: the PIL image
processors (`Qwen2VLImageProcessorPil`, ...) work. So, only when torchvision is missing:
- `processor_class(cls)` is a subclass of `cls`, of the same name, that has no video processor
  (so `save_pretrained` writes the standard `processor_class` and nothing about videos);
- `load_processor(path)` assembles the processor from its parts (PIL image processor, tokenizer,
  chat template, processor options) where `AutoProcessor.from_pretrained` would silently return the
  bare tokenizer;
- `image_processor_class(prefix)` is the PIL image processor (`<prefix>ImageProcessorPil`) instead
  of the torchvision one, and `build_processor` leaves the video processor out.
With torchvision present, all of them are the plain transformers classes and calls. No other module
tests for torchvision.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or installed but unloadable beside this torch ("torchvision::nms")
        return False
    return True


HAS_TORCHVISION = _torchvision_available()
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
_SUBPROCESSOR_KEYS = ("image_processor", "video_processor", "feature_extractor", "audio_processor", "tokenizer")


def processor_class(cls: type) -> type:
    """`cls` itself with torchvision, else its video-less twin (same class name)."""
    if HAS_TORCHVISION or "video_processor" not in cls.get_attributes():
        return cls
    return _without_video(cls)


@functools.cache
def _without_video(cls: type) -> type:
    attributes = [a for a in cls.get_attributes() if a != "video_processor"]
    members = {"get_attributes": classmethod(lambda _: list(attributes)), "__module__": __name__}
    return type(cls.__name__, (cls,), members)


def image_processor_class(prefix: str) -> type:
    """transformers' `<prefix>ImageProcessor` (torchvision backend) with torchvision, else its PIL twin
    `<prefix>ImageProcessorPil` (same options, same saved `image_processor_type` family)."""
    import transformers

    return getattr(transformers, f"{prefix}ImageProcessor" if HAS_TORCHVISION else f"{prefix}ImageProcessorPil")


def build_processor(
    cls: type,
    image_processor: Any,
    tokenizer: Any,
    chat_template: str | None,
    video_processor: Callable[[], Any] | None = None,
    **options: Any,
):
    """A processor of class `cls` from its parts. `video_processor` builds the video processor the
    Qwen-VL classes require with torchvision; it is called only when torchvision is present (a video
    processor cannot be built without it, and the video-less twin of `cls` takes none)."""
    if HAS_TORCHVISION and video_processor is not None:
        options["video_processor"] = video_processor()
    return processor_class(cls)(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                                **options)


def load_processor(path: str | Path):
    """`AutoProcessor.from_pretrained(path)`, or, without torchvision, the same processor assembled
    from the folder's image processor, tokenizer, chat template and processor options. A text-only
    model's folder (no processor files) gives its tokenizer, as `AutoProcessor` does."""
    import transformers

    if HAS_TORCHVISION:
        return transformers.AutoProcessor.from_pretrained(path)
    path = Path(path)
    if (path / "tokenizer_config.json").is_file() and not any((path / n).is_file() for n in _PROCESSOR_FILES):
        return transformers.AutoTokenizer.from_pretrained(path)
    config: dict[str, Any] = {}
    for name in _PROCESSOR_FILES:
        if (path / name).is_file():
            config = {**json.loads((path / name).read_text()), **config}
    name = config.get("processor_class")
    if not name:
        raise ValueError(f"{path}: no processor_class in {' or '.join(_PROCESSOR_FILES)}; not a saved VLM processor")
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ValueError(f"{path}: unknown processor_class {name!r} in this transformers version")
    image_processor = transformers.AutoImageProcessor.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    chat_template = None
    if (path / "chat_template.jinja").is_file():
        chat_template = (path / "chat_template.jinja").read_text()
    elif (path / "chat_template.json").is_file():
        chat_template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    else:
        chat_template = getattr(tokenizer, "chat_template", None)
    init = set(inspect.signature(cls.__init__).parameters)
    options = {k: v for k, v in config.items() if k in init and k not in _SUBPROCESSOR_KEYS and k != "chat_template"}
    return build_processor(cls, image_processor, tokenizer, chat_template, **options)
