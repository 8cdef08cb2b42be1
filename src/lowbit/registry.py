"""Named, registered pydantic models: codecs, algorithms, transforms. A recipe names them as data
(``{"name": "gptq", ...}``) and each family's base class keeps a registry of its subclasses."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class Registered(BaseModel):
    """A frozen model registered, when it declares ``name: Literal["..."] = "..."``, in the
    ``registry`` of the family base class that declares one (``registry: ClassVar[dict] = {}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    registry: ClassVar[dict[str, Any]]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: object) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("name")
        if field is not None and isinstance(field.default, str):
            cls.registry[field.default] = cls
