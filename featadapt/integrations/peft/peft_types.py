"""PeftType members for featadapt's methods: PEFT registers only methods named in its enum."""

from peft.utils import PeftType


def peft_type_member(name):
    """PeftType[name], added to the enum when PEFT does not have it.

    Mirrors how the enum machinery builds a member of a str-mixin Enum (aenum's
    extend_enum does the same; aenum is not a PEFT dependency), then checks
    every way PEFT and transformers look a member up, so a change in the enum
    internals fails here, loudly, instead of somewhere inside PEFT.
    """
    member = PeftType.__members__.get(name)
    if member is not None:
        return member
    member = PeftType._member_type_.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # Bind the attribute before entering _member_map_: the enum metaclass
    # refuses to rebind a name that is already a member.
    setattr(PeftType, name, member)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    if not (
        PeftType(name) is member
        and PeftType[name] is member
        and getattr(PeftType, name) is member
        and member in list(PeftType)
        and member.value == name
    ):
        raise RuntimeError(
            f"featadapt could not add {name!r} to peft's PeftType enum on this Python version; "
            "please report this with your Python and peft versions"
        )
    return member


VEFA = peft_type_member("VEFA")
LORFA = peft_type_member("LORFA")
