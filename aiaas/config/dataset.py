"""``kind: dataset`` — where a data set comes from and how it is split into Parquet; for chat
sources, also which tokenizer and chat template turn conversations into tokens."""

from __future__ import annotations

import difflib
from typing import Annotated, Literal

from pydantic import (
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from aiaas import errors, model_ref, skills
from aiaas.config.base import ConfigModel, Name


class DigitsSource(ConfigModel):
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes): real data, no download."""

    type: Literal["sklearn_digits"] = Field(description="always 'sklearn_digits'")


class GeneratedSource(ConfigModel):
    """A generated classification table of any size (scikit-learn's make_classification)."""

    type: Literal["generated"] = Field(description="always 'generated'")
    rows: PositiveInt = Field(description="rows in all splits together, e.g. 1000000")
    features: Annotated[int, Field(ge=2, le=4096)] = Field(20, description="feature columns")
    classes: Annotated[int, Field(ge=2, le=1000)] = Field(2, description="label classes")
    informative: PositiveInt | None = Field(
        None, description="features that carry signal; defaults to half of 'features'"
    )

    @model_validator(mode="after")
    def _informative_fits(self) -> GeneratedSource:
        if self.informative is not None and self.informative > self.features:
            raise ValueError(
                f"informative ({self.informative}) exceeds features ({self.features}); "
                "lower informative or raise features"
            )
        return self


class FileSource(ConfigModel):
    """A user's CSV or Parquet file, or a directory of them."""

    type: Literal["file"] = Field(description="always 'file'")
    path: str = Field(description="a .csv/.parquet file or a directory of them")
    format: Literal["csv", "parquet"] | None = Field(
        None, description="file format; inferred from the file ending when left out"
    )


class ChatSource(ConfigModel):
    """Chat conversations (OpenAI-style ``messages``): a JSONL file, or a skill of
    :mod:`aiaas.skills` generated here."""

    type: Literal["chat"] = Field(description="always 'chat'")
    path: str | None = Field(
        None,
        description='a .jsonl file, one {"messages": [{"role": ..., "content": ...}, ...]} '
        "per line, each ending with the assistant's answer",
    )
    generator: str | None = Field(
        None, description=f"a skill to generate instead of a file: {', '.join(skills.SKILLS)}"
    )
    rows: PositiveInt | None = Field(
        None, description="generated conversations in all splits together (generator only)"
    )

    @field_validator("generator")
    @classmethod
    def _known_skill(cls, value: str | None) -> str | None:
        if value is not None and value not in skills.SKILLS:
            close = difflib.get_close_matches(value, skills.SKILLS, n=1)
            guess = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(
                f"unknown skill '{value}'; {guess}skills: {', '.join(sorted(skills.SKILLS))}"
            )
        return value

    @model_validator(mode="after")
    def _file_or_generator(self) -> ChatSource:
        if (self.path is None) == (self.generator is None):
            raise ValueError(
                "set exactly one of 'path' (a JSONL file) and 'generator' (a skill to generate)"
            )
        if self.generator is not None and self.rows is None:
            raise ValueError(f"generator '{self.generator}' needs 'rows', e.g. rows: 800")
        if self.path is not None and self.rows is not None:
            raise ValueError("'rows' is for generators; a file's rows are its lines: remove it")
        return self


Source = Annotated[
    DigitsSource | GeneratedSource | FileSource | ChatSource, Field(discriminator="type")
]


class Splits(ConfigModel):
    """Fractions of the rows in each split; they add up to 1."""

    train: float = Field(0.7, gt=0, lt=1, description="fraction used for training")
    validation: float = Field(0.15, gt=0, lt=1, description="fraction for per-epoch validation")
    test: float = Field(0.15, gt=0, lt=1, description="fraction held out for the registration gate")

    @model_validator(mode="after")
    def _sum_to_one(self) -> Splits:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + validation + test = {total:g}; the fractions must add up to 1"
            )
        return self


class DatasetConfig(ConfigModel):
    """A data set prepared as train/validation/test Parquet under the storage root."""

    kind: Literal["dataset"] = Field(description="always 'dataset'")
    name: Name = Field(description="data set name; train configs refer to it")
    source: Source = Field(description="where the rows come from")
    label: str = Field("label", description="the label column (file sources: must exist)")
    splits: Splits = Field(default_factory=Splits, description="split fractions")
    seed: NonNegativeInt = Field(0, description="seed of the shuffle before splitting")
    rows_per_file: PositiveInt = Field(
        200_000, description="rows per Parquet file; files are Ray Data's unit of parallelism"
    )
    tokenizer: str | None = Field(
        None,
        description="chat sources: the causal LM whose tokenizer and chat template tokenize the "
        "conversations, a registry reference (smollm2@production, smollm2:1) or a local "
        "Hugging Face directory (a path with '/')",
    )
    max_seq_len: Annotated[int, Field(ge=16, le=131_072)] = Field(
        256, description="chat sources: tokens per row; shorter rows are padded to it"
    )
    packing: bool = Field(
        False,
        description="chat sources: pack several conversations into each train row (restarting "
        "position_ids at each); validation and test stay one conversation per row",
    )
    truncate: bool = Field(
        False,
        description="chat sources: cut conversations longer than max_seq_len instead of "
        "refusing them (the cut loses the end of the answer)",
    )

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_for_chat(cls, value: str | None, info: ValidationInfo) -> str | None:
        # With a wrong source, whether a tokenizer belongs here is unknown; its syntax is not.
        if "source" in info.data:
            chat = isinstance(info.data["source"], ChatSource)
            if chat and value is None:
                raise ValueError(
                    "a chat source needs a tokenizer: a causal LM of the registry "
                    "(e.g. smollm2@production) or a Hugging Face directory"
                )
            if not chat and value is not None:
                raise ValueError("only chat sources are tokenized; remove 'tokenizer'")
        if value is not None and not is_directory_reference(value):
            try:
                model_ref.parse_ref(value)
            except errors.ConfigError:
                raise ValueError(
                    f"'{value}' is neither a model reference (NAME, NAME:VERSION, NAME@ALIAS, "
                    "e.g. smollm2@production) nor a directory (a path with '/')"
                ) from None
        return value

    @model_validator(mode="after")
    def _chat_fields_for_chat(self) -> DatasetConfig:
        chat_only = {"max_seq_len", "packing", "truncate"} & self.model_fields_set
        if chat_only and not isinstance(self.source, ChatSource):
            raise ValueError(
                f"{', '.join(sorted(chat_only))}: only chat sources are tokenized; remove "
                f"{'it' if len(chat_only) == 1 else 'them'}"
            )
        if isinstance(self.source, ChatSource) and "label" in self.model_fields_set:
            raise ValueError(
                "'label' names a table's label column; a chat source's labels are its "
                "assistant turns: remove it"
            )
        return self


def is_directory_reference(tokenizer: str) -> bool:
    """True when ``tokenizer`` names a local directory rather than a registry version."""
    return "/" in tokenizer or tokenizer.startswith(("~", "."))
