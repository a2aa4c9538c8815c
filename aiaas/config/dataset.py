"""``kind: dataset`` — where a data set comes from and how it is split into Parquet."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

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


Source = Annotated[DigitsSource | GeneratedSource | FileSource, Field(discriminator="type")]


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
