"""What a WSSS method is to the rest of cpal: a `MethodSpec` registered under its name.

The config's `method` is validated against `METHODS`; the network builder, inference,
evaluation, figures and the ablation read the spec (does the method have a prototype
branch, which maps can it write, which does it write by default, which parts of the
branch are on), so no other module compares method names. A new method is a module in
`cpal.methods` that registers its spec, plus its name in `METHODS`'s built-ins.
"""

from __future__ import annotations

from dataclasses import dataclass

from cpal.registry import Registry

DEFAULT_METHOD = "cam"
"""The config's default `method`: the baseline."""
CAM_MAP, PACAM_MAP, FUSED_MAP = "cam", "pacam", "fused"
MAP_KINDS: tuple[str, ...] = (CAM_MAP, PACAM_MAP, FUSED_MAP)
"""Localisation maps `infer` can write: the CAM, the prototype-aware CAM (with its own
background channel), or the mean of the two (`infer.map`)."""


@dataclass(frozen=True)
class PrototypeBranch:
    """What a method's prototype branch (`CPALModule`) adds to SIPE's image-specific
    prototypes (docs/method.md, steps 4-7)."""

    bank: bool = False
    """A support bank of past instance prototypes, whose context mixes into p*."""
    selection: bool = False
    """Top-K soft selection among k-means context clusters (else the bank's mean)."""
    alignment: bool = False
    """Feature distribution alignment of the embedding towards the selected context."""

    def __post_init__(self) -> None:
        if (self.selection or self.alignment) and not self.bank:
            raise ValueError("selection and alignment read the support bank: set bank=True")


@dataclass(frozen=True)
class MethodSpec:
    """A method as the pipeline sees it."""

    name: str
    summary: str
    """One line for `--help` and the docs."""
    branch: PrototypeBranch | None = None
    """The prototype branch on the CAM network; None: the CAM alone."""
    default_map: str = CAM_MAP
    """What `infer.map: auto` writes."""
    maps: tuple[str, ...] = (CAM_MAP,)
    """The map kinds the method can write (`infer.map`)."""
    ablation: bool = False
    """A rung of `cpal ablate`'s ladder (rungs run in registration order)."""
    network: str = "cam"
    """The localisation network it trains and makes maps with
    (`cpal.models.registry.NETWORKS`: cam, mctformer, clip_es)."""
    trains: bool = True
    """False: maps come straight from pretrained weights (CLIP-ES); `cpal run` skips the
    training stage and `cpal train` refuses."""
    refiner: str | None = None
    """The refiner (`cpal.refine.REFINERS`) its reference turns maps into pseudo masks
    with, for a refinement stage to apply (CLIP-ES: `crf_clip_es` on [1 - max, maps]);
    None: the stage's own choice."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.maps if m not in MAP_KINDS]
        if unknown or self.default_map not in self.maps:
            raise ValueError(f"method {self.name!r}: maps {self.maps} must be among "
                             f"{MAP_KINDS} and hold the default {self.default_map!r}")
        if self.branch is None and set(self.maps) - {CAM_MAP}:
            raise ValueError(f"method {self.name!r}: prototype maps need a prototype branch")

    @classmethod
    def with_prototypes(cls, name: str, summary: str, branch: PrototypeBranch, *,
                        ablation: bool = True, network: str = "cam") -> MethodSpec:
        """A method with a prototype branch on `network`: it writes PACAM by default and
        may write any map kind."""
        return cls(name, summary, branch, default_map=PACAM_MAP, maps=MAP_KINDS,
                   ablation=ablation, network=network)

    @property
    def has_prototypes(self) -> bool:
        return self.branch is not None


METHODS: Registry[MethodSpec] = Registry(
    "method", builtins=("cpal.methods.cam", "cpal.methods.sipe", "cpal.methods.cpal",
                        "cpal.methods.mctformer", "cpal.methods.clip_es"),
)


def register_method(spec: MethodSpec) -> MethodSpec:
    return METHODS.register(spec.name, spec)


def method_spec(name: str) -> MethodSpec:
    return METHODS.get(name)


def ablation_ladder() -> tuple[str, ...]:
    """The methods `cpal ablate` trains, in registration order."""
    return tuple(name for name, spec in METHODS.items() if spec.ablation)
