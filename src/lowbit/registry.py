"""Named, registered pydantic models: codecs, algorithms, transforms. A recipe names them as data
(``{"name": "gptq", ...}``) and each family's base class keeps a registry of its subclasses."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer


class Registered(BaseModel):
    """A frozen model registered, when it declares ``name: Literal["..."] = "..."``, in the
    ``registry`` of the family base class that declares one (``registry: ClassVar[dict] = {}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    registry: ClassVar[dict[str, Any]]
    #: fields added after files and recipe digests existed: left out of every dump while at their
    #: default, so that stored codec dicts and the digests of earlier recipes stay what they were
    late_fields: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _without_late_defaults(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for f in self.late_fields:
                if f in data and getattr(self, f) == type(self).model_fields[f].default:
                    del data[f]
        return data

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: object) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("name")
        if field is not None and isinstance(field.default, str):
            cls.registry[field.default] = cls
