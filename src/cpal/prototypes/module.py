"""CPALModule: (features, CAM, labels) -> prototype-aware CAM and its losses.

The module knows nothing about the network that made the features: a list of maps with
known channel counts (ResNet stages, MCTformer patch tokens, CLIP features) plus a raw CAM
at the resolution of the last map. See docs/method.md, steps 2-10.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpal.config import AlignmentConfig, AwarenessConfig, BankConfig, PrototypeConfig
from cpal.methods import PrototypeBranch
from cpal.prototypes.alignment import alignment_shift, compactness_loss
from cpal.prototypes.awareness import context_aware_prototype, positiveness, select_top_k
from cpal.prototypes.bank import SupportBank
from cpal.prototypes.head import EmbeddingHead
from cpal.prototypes.pacam import (
    SelfAverage,
    max_normalise,
    prototype_similarity,
    self_supervision_loss,
    shifted_prototype_similarity,
)
from cpal.prototypes.pooling import (
    argmax_seeds,
    background_and_classes,
    channel_mask,
    channel_valid,
    pcm_refine,
    region_prototypes,
    region_weights,
    sipe_seeds,
)


@dataclass
class CPALOutput:
    pacam: Tensor  # (B, C+1, h, w) in [0, 1], bg channel 0, absent classes 0
    cam_norm: Tensor  # (B, C+1, h, w) the L_self target M (masked; PCM-refined under pcm)
    losses: dict[str, Tensor]  # "self" (+ "fda"), unweighted
    prototypes: Tensor  # (B, C+1, D) instance prototypes p (raw if not prototype.normalize)
    context_prototypes: Tensor  # (B, C+1, D) p* actually used
    valid: Tensor  # (B, C+1) bool
    selected: Tensor | None  # (B, C+1, k) context indices, -1 where none
    selection_weights: Tensor | None = None  # (B, C+1, k) w_j of `selected`, 0 where none
    similarity: Tensor | None = None  # (B, C+1, h, w) relu-cosine maps before normalisation
    seeds: Tensor | None = None  # (B, C+1, h, w) one-hot seeds (region sipe_seeds / pcm)


class CPALModule(nn.Module):
    """The prototype branch of every variant from `sipe` to the full `cpal`; `branch` (a
    method's `PrototypeBranch`) says which of bank, selection and alignment are on."""

    step: Tensor

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        branch: PrototypeBranch,
        prototype: PrototypeConfig,
        bank: BankConfig,
        awareness: AwarenessConfig,
        alignment: AlignmentConfig,
        self_average: SelfAverage = "all",
    ) -> None:
        super().__init__()
        self.branch = branch
        self.num_classes = num_classes
        self.pcfg, self.bcfg, self.acfg, self.fcfg = prototype, bank, awareness, alignment
        self.self_average = self_average
        self.uses_bank = branch.bank
        self.uses_selection = branch.selection
        self.uses_alignment = branch.alignment
        self.head = EmbeddingHead(
            in_channels, prototype.features, projection=prototype.projection,
            init=prototype.head_init, align_corners=prototype.align_corners,
        )
        # SFC's pixel-correlation guide: a 1x1 conv on [image, last map].
        self.pcm = None
        if prototype.seed_source == "pcm":
            last = int(in_channels[-1])
            self.pcm = nn.Conv2d(3 + last, last, 1, bias=False)
        self.bank: SupportBank | None = None
        if self.uses_bank:
            self.bank = SupportBank(
                num_classes + 1,
                bank.size,
                self.head.dim,
                clusters=bank.clusters if self.uses_selection else 1,
                normalize=prototype.normalize,
            )
        # Counts bank updates (training forwards, or flushes when deferred): drives
        # reclustering and is restored with the bank.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # A loop that splits a batch into micro-batches or processes sets this: forward then
        # only collects its prototypes and `flush_bank` enqueues them once per optimizer step.
        self.defer_bank_updates = False
        self._pending: list[tuple[Tensor, Tensor, Tensor | None]] = []

    # ------------------------------------------------------------------------------------

    def forward(
        self,
        features: Sequence[Tensor],
        cam: Tensor,
        labels: Tensor,
        sample_ids: Tensor | None = None,
        valid_area: Tensor | None = None,
        image: Tensor | None = None,
    ) -> CPALOutput:
        """The training step's prototype branch (as SIPE's `Net.forward`).

        features: the network's maps (the last one at the CAM's resolution); cam (B, C, h, w)
        raw; labels (B, C) multi-hot; valid_area (B, 1, h, w): 1 on image pixels, 0 on the
        crop's padding (null: all image); image: the input batch (needed by the pcm seeds);
        sample_ids (B,): dataset indices, recorded as the provenance of bank entries.
        """
        features = list(features)
        z = self.head(features)
        seed_features = features[-1] if self.pcfg.seed_features == "layer4" else z
        spatial = valid_area if self.pcfg.mask_padding else None
        return self.prototype_maps(
            z, cam, labels, seed_features, spatial=spatial, image=image,
            last=features[-1], sample_ids=sample_ids, training_target=True,
        )

    def embed(self, features: Sequence[Tensor]) -> Tensor:
        """z = v(features): the embedding prototypes are pooled from."""
        return self.head(list(features))

    def prototype_maps(
        self,
        z: Tensor,
        cam: Tensor,
        labels: Tensor,
        seed_features: Tensor,
        *,
        spatial: Tensor | None = None,
        image: Tensor | None = None,
        last: Tensor | None = None,
        sample_ids: Tensor | None = None,
        training_target: bool = False,
    ) -> CPALOutput:
        """Seeds, prototypes, context and PACAM from an embedding z (B, D, h, w).

        training_target=True masks the CAM by the labels (and `spatial`) before the seeds,
        as SIPE's training step; False is SIPE's inference, whose seeds compete against
        every class's map (a pixel won by an absent class belongs to no seed). Inference
        passes flip-fused z and CAM here; the bank is only updated in training mode.
        """
        if z.shape[-2:] != cam.shape[-2:]:
            raise ValueError(
                f"the CAM ({tuple(cam.shape[-2:])}) must match the last feature map "
                f"({tuple(z.shape[-2:])})"
            )
        pc = self.pcfg
        labels = labels.to(cam.dtype)
        valid = channel_valid(labels)
        mask = channel_mask(labels, spatial).to(cam.dtype)
        full = background_and_classes(cam, labels, pc.background_from)
        target = full * mask
        seed_cam = target if training_target else full
        seeds = None
        if pc.seed_source == "pcm":
            if image is None or last is None:
                raise ValueError("prototype.seed_source=pcm needs the input image")
            small = F.interpolate(image.to(cam.dtype), size=cam.shape[-2:], mode="bilinear",
                                  align_corners=True)
            assert self.pcm is not None
            seed_cam = pcm_refine(seed_cam, self.pcm(torch.cat([small, last], dim=1)))
            target = seed_cam * mask if training_target else seed_cam
            seeds = argmax_seeds(seed_cam.detach(), mask.expand_as(seed_cam), pc.bg_factor)
        elif pc.region == "sipe_seeds":
            seeds = sipe_seeds(seed_features, seed_cam, mask.expand_as(seed_cam),
                               bg_factor=pc.bg_factor)
        weights = region_weights(
            target, labels, tau=pc.tau, tau_bg=pc.tau_bg,
            region="sipe_seeds" if seeds is not None else pc.region, seeds=seeds,
            empty=pc.empty_region,
        )
        p = region_prototypes(z, weights, valid, pc.normalize)
        # Channels with a prototype: an empty seed (SIPE: zero prototype) neither enters
        # the bank nor receives context.
        filled = valid & (weights.flatten(2).sum(2) > 0)

        p_star, delta, selected, sel_w = p, None, None, None
        if self.bank is not None:
            p_star, ctx, active, selected, sel_w = self._context(p, filled)
            if self.uses_alignment:
                delta = alignment_shift(p, ctx) * active[..., None].to(p.dtype)

        if delta is not None and self.fcfg.beta > 0:
            # The shift weights M_c are detached: L_self should shape the CAM through
            # |M - PACAM|, not by moving the features it is compared against.
            sim = shifted_prototype_similarity(
                z, target.detach(), delta, self.fcfg.beta, p_star, valid
            )
        else:
            sim = prototype_similarity(z, p_star, valid)
        pacam = max_normalise(sim, valid)

        losses = {"self": self_supervision_loss(target, pacam, valid, self.self_average)}
        if self.uses_alignment and self.fcfg.loss_weight > 0:
            losses["fda"] = compactness_loss(z, weights, p_star)

        if self.training and self.bank is not None:
            if self.defer_bank_updates:
                self._pending.append((p.detach(), filled, sample_ids))
            else:
                self._update_bank(p.detach(), filled, sample_ids)

        return CPALOutput(
            pacam=pacam,
            cam_norm=target,
            losses=losses,
            prototypes=p,
            context_prototypes=p_star,
            valid=valid,
            selected=selected,
            selection_weights=sel_w,
            similarity=sim,
            seeds=seeds,
        )

    # ------------------------------------------------------------------------------------

    def _context(
        self, p: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """(p*, ctx, active (B, K), selected, weights) against the bank's current context.

        A channel is active (p* != p) once its queue holds >= top_k entries and it has a
        context; before that the method is SIPE's image-specific prototype (warm-up).
        """
        assert self.bank is not None
        a = self.acfg
        b, k, _ = p.shape
        n_held = self.bank.counts()
        if a.background == "instance":  # channel 0 never gets context: SIPE's own background
            n_held = n_held.clone()
            n_held[0] = 0
        if not self.uses_selection:
            mean, _ = self.bank.mean_contexts()
            ready = n_held >= a.top_k
            ctx = mean.to(p.dtype)[None].expand(b, -1, -1)
            p_mix, ctx = context_aware_prototype(
                p, ctx.unsqueeze(2), p.new_ones(b, k, 1), a.alpha
            )
            active = ready[None] & valid
            return torch.where(active[..., None], p_mix, p), ctx, active, None, None

        table, _, cvalid = self.bank.context_table()
        table = table.to(p.dtype)
        ready = (n_held >= a.top_k) & cvalid.any(dim=1)  # (K,)
        scores = positiveness(p, table, a.score)  # (B, K, kmax)
        scores = scores.masked_fill(~cvalid[None], float("-inf"))
        # Rows without any context get finite scores so the softmax stays NaN-free
        # (their result is discarded below, but NaN would poison the backward pass).
        scores = torch.where(ready[None, :, None], scores, torch.zeros_like(scores))
        idx, w = select_top_k(scores, a.top_k, a.temperature)  # (B, K, k')
        chan = torch.arange(k, device=p.device)[None, :, None]
        sel_ctx = table[chan, idx]  # (B, K, k', D)
        active = ready[None] & valid
        sel_ok = cvalid[chan, idx] & active[..., None]
        w = w * sel_ok.to(w.dtype)
        p_mix, ctx = context_aware_prototype(p, sel_ctx, w, a.alpha)
        p_star = torch.where(active[..., None], p_mix, p)
        ctx = torch.where(active[..., None], ctx, p)
        selected = torch.where(sel_ok, idx, torch.full_like(idx, -1))
        return p_star, ctx, active, selected, w

    def discard_pending(self) -> None:
        """Drop the prototypes collected since the last flush (a step the fp16 gradient
        scaler skipped: its forward may have overflowed, and the bank must stay finite)."""
        self._pending.clear()

    @torch.no_grad()
    def flush_bank(self) -> None:
        """Enqueue the prototypes collected since the last flush as one update, in forward
        order: the same bank as one forward over the concatenated images. In a data-parallel
        run every rank calls it at the same step (the enqueue gathers all ranks' rows)."""
        if not self._pending:
            return
        p = torch.cat([x for x, _, _ in self._pending])
        valid = torch.cat([v for _, v, _ in self._pending])
        ids = [s for _, _, s in self._pending]
        sample_ids = None if any(s is None for s in ids) else torch.cat(ids)  # type: ignore[arg-type]
        self._pending.clear()
        self._update_bank(p, valid, sample_ids)

    @torch.no_grad()
    def _update_bank(self, p: Tensor, valid: Tensor, sample_ids: Tensor | None = None) -> None:
        """Enqueue this batch's present-class + background prototypes; recluster on schedule."""
        assert self.bank is not None
        b, k, _ = p.shape
        chans = torch.arange(k, device=p.device).expand(b, k)
        # Provenance: each row's image index (one per channel of that image).
        src = None if sample_ids is None else sample_ids.to(p.device)[:, None].expand(b, k)
        self.bank.enqueue_synced(p[valid], chans[valid], None if src is None else src[valid])
        self.step += 1
        if not self.uses_selection:
            return
        due = int(self.step) % self.bcfg.recluster_every == 0
        if not due:
            # A channel that just became ready but whose context was built from fewer than
            # top_k entries (or none): cluster now rather than waiting up to recluster_every
            # steps. This adds at most C+1 reclusters to a run.
            ready = self.bank.counts() >= self.acfg.top_k
            clustered = self.bank.ctx_count.sum(dim=1)
            due = bool((ready & (clustered < self.acfg.top_k)).any())
        if due:
            self.refresh_context()

    @torch.no_grad()
    def context_sources(self, out: CPALOutput, image: int, channel: int) -> list[tuple[float, int]]:
        """(w_j, sample index) per context prototype selected for (image, channel), best
        first: the source of the bank entry nearest to that prototype (-1 unknown).

        Empty without a selection (sipe, cpal-mean) or while the channel warms up. For
        figures: reads the bank, never changes it.
        """
        if self.bank is None or out.selected is None or out.selection_weights is None:
            return []
        sel = out.selected[image, channel]
        ok = sel >= 0
        if not bool(ok.any()):
            return []
        targets = self.bank.context_table()[0][channel][sel[ok]]
        sources = self.bank.nearest_sources(channel, targets, 1)[:, 0]
        weights = out.selection_weights[image, channel][ok]
        return [(float(w), int(i)) for w, i in zip(weights, sources, strict=True)]

    @torch.no_grad()
    def refresh_context(self) -> None:
        """Recluster the bank now (e.g. before saving the final checkpoint).

        The k-means generator is seeded by the step counter, so every rank of a data-
        parallel run (identical banks) computes identical context.
        """
        if self.bank is None or not self.uses_selection:
            return
        gen = torch.Generator().manual_seed(int(self.step))
        self.bank.recluster(self.bcfg.clusters, self.bcfg.kmeans_iters, generator=gen)
