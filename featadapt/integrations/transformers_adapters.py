"""transformers' own adapter methods (`model.add_adapter`, `load_adapter`, ...)
and the peft release they need.

Each transformers release names the oldest peft its adapter methods accept
(`transformers.integrations.peft.MIN_PEFT_VERSION`), and a new transformers
can demand a peft that has not been released yet (transformers 5.24 wants
peft>=0.22 while the newest is 0.21.2). PEFT's own API, `get_peft_model` and
`PeftModel.from_pretrained`, does not go through those methods and keeps
working. `guard_adapter_methods` makes the methods fail, in that case, with
featadapt's own error that names both versions and the way around it,
instead of transformers' bare version complaint.
"""

import functools

# The methods of transformers' PeftAdapterMixin that check the peft version.
ADAPTER_METHODS = (
    "add_adapter", "load_adapter", "set_adapter", "disable_adapters", "enable_adapters",
    "active_adapters", "get_adapter_state_dict", "delete_adapter",
)
_GUARDED = "_featadapt_peft_version_guard"


class PeftVersionError(ValueError):
    """transformers' adapter methods need a newer peft than the one installed.

    A ``ValueError``, raised by transformers' ``model.add_adapter`` and
    ``load_adapter`` on a VeFA or LoRFA config when the installed pair does not
    work; the message names both versions (see `adapter_methods_unsupported_reason`).
    """


def _versions():
    """(transformers version, the peft it requires or None, installed peft version)."""
    import peft
    import transformers

    try:
        from transformers.integrations import peft as hf_peft
    except ImportError:  # a transformers without the adapter mixin
        return transformers.__version__, None, peft.__version__
    return transformers.__version__, getattr(hf_peft, "MIN_PEFT_VERSION", None), peft.__version__


def adapter_methods_unsupported_reason():
    """Why transformers' own adapter methods do not work with the installed peft, if they do not.

    transformers' ``model.add_adapter``, ``load_adapter`` and ``set_adapter``
    accept only the peft releases that transformers names (from transformers
    5.24 on: peft 0.22 or newer). PEFT's own API (``get_peft_model``,
    ``PeftModel.from_pretrained``) works either way.

    Returns:
        str or None: None where the pair works; else the message that
        `PeftVersionError` carries, with both versions and what to use instead.
    """
    from packaging.version import Version

    transformers_version, required, installed = _versions()
    if required is None or Version(installed) >= Version(required):
        return None
    return (
        f"transformers {transformers_version}'s adapter methods (model.add_adapter, load_adapter, ...) "
        f"need peft>={required}, and peft {installed} is installed. featadapt's PEFT methods work "
        f"with these versions through PEFT's own API: peft.get_peft_model(model, config) and "
        f"peft.PeftModel.from_pretrained(model, path). To use the transformers methods, install "
        f"peft>={required} or a transformers whose adapter methods accept peft {installed}."
    )


def guard_adapter_methods():
    """Wrap transformers' adapter methods so that, while the installed peft is too
    old for them, they raise PeftVersionError (a ValueError, as transformers'
    own check is) with featadapt's message. The versions are read at each call.
    Idempotent; nothing happens without transformers."""
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:
        return
    for name in ADAPTER_METHODS:
        method = getattr(PeftAdapterMixin, name, None)
        if method is None or getattr(method, _GUARDED, False):
            continue
        setattr(PeftAdapterMixin, name, _guarded(method))


def _guarded(method):
    @functools.wraps(method)
    def guarded(*args, **kwargs):
        reason = adapter_methods_unsupported_reason()
        if reason is not None:
            raise PeftVersionError(f"{method.__name__}: {reason}")
        return method(*args, **kwargs)

    setattr(guarded, _GUARDED, True)
    return guarded
