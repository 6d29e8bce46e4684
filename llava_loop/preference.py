"""Preference objectives on the loop's loss API: DPO (sigmoid), IPO and DPO + SFT (RPO), for batches of preference
pairs (data/preference.py: every chosen sequence, then every rejected one).

Each is a loss like any user's: ``loss(model, batch, reference, **kwargs) -> dict`` of sums over the batch's pairs,
declared ``unit = "pairs"`` so the loop divides them by the global batch's pair count (exact whatever the layout),
and given the run's ``reference`` (reference.py) because it declares that parameter. A sequence's log-probability
is the sum over its supervised tokens (the answer and its end of turn), the LM head applied at those positions only.

Logged per step (means over pairs): ``rewards/chosen`` and ``rewards/rejected`` (beta x the policy's log-ratio to
the reference), ``rewards/margin``, ``rewards/accuracy`` (the share of pairs whose chosen reward is higher), and
the policy's and reference's log-probabilities of each answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .losses import CHUNK_ROWS, supervised_hidden


def _chunk_logps(head, hidden, targets):
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def token_logps(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """``log p(target)`` at each supervised position, at most ``chunk_rows`` rows of logits alive at once (each chunk
    recomputed in backward, as losses.chunked_ce does)."""
    chunks = zip(hidden.split(chunk_rows), targets.split(chunk_rows))
    if hidden.shape[0] <= chunk_rows or not torch.is_grad_enabled():
        return torch.cat([_chunk_logps(head, h, t) for h, t in chunks])
    return torch.cat([checkpoint(_chunk_logps, head, h, t, use_reentrant=False) for h, t in chunks])


def sequence_logps(model, batch: dict, chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-probability, supervised tokens)`` of each of the batch's sequences (its rows, or a packed row's
    samples), in batch order."""
    head, hidden, targets = supervised_hidden(model, batch)
    logps = token_logps(head, hidden, targets, chunk_rows)
    n = batch["n_samples"] + batch["n_pairs"]
    index = batch["supervised_sequence"].to(logps.device)
    sums = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, index, logps)
    counts = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, index, torch.ones_like(logps))
    return sums, counts


def pair_logps(model, batch: dict, reference):
    """The policy's and the reference's ``(chosen, rejected)`` log-probabilities of each pair, and each answer's
    ``(chosen, rejected)`` supervised token counts."""
    pairs = batch["n_pairs"]
    if not pairs or pairs != batch["n_samples"]:
        raise ValueError("a preference loss needs a batch of preference pairs (records with chosen and rejected)")
    policy, tokens = sequence_logps(model, batch)
    ref = reference.logps(batch).to(policy)
    return (policy[:pairs], policy[pairs:]), (ref[:pairs], ref[pairs:]), (tokens[:pairs], tokens[pairs:])


def _terms(losses, beta, policy, ref) -> dict:
    chosen, rejected = beta * (policy[0] - ref[0]).detach(), beta * (policy[1] - ref[1]).detach()
    return {
        "loss": losses.sum(),
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/margin": (chosen - rejected).sum(),
        "rewards/accuracy": (chosen > rejected).float().sum(),
        "logps/chosen": policy[0].detach().sum(),
        "logps/rejected": policy[1].detach().sum(),
        "ref_logps/chosen": ref[0].sum(),
        "ref_logps/rejected": ref[1].sum(),
    }


def sigmoid_losses(policy, ref, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO's per-pair sigmoid loss, with conservative DPO's ``label_smoothing`` (the assumed share of flipped
    preferences; 0: DPO)."""
    logits = beta * ((policy[0] - ref[0]) - (policy[1] - ref[1]))
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def dpo(model, batch: dict, reference, beta: float = 0.1, label_smoothing: float = 0.0) -> dict:
    """DPO's sigmoid loss (Rafailov et al., 2023)."""
    policy, ref, _ = pair_logps(model, batch, reference)
    return _terms(sigmoid_losses(policy, ref, beta, label_smoothing), beta, policy, ref)


def ipo(model, batch: dict, reference, beta: float = 0.1) -> dict:
    """IPO (Azar et al., 2023): the squared distance from 1 / (2 beta) of the margin between the answers'
    log-ratios, each averaged over its answer's tokens (as TRL computes it, confirmed with the authors there)."""
    policy, ref, tokens = pair_logps(model, batch, reference)
    chosen = (policy[0] - ref[0]) / tokens[0].clamp(min=1)
    rejected = (policy[1] - ref[1]) / tokens[1].clamp(min=1)
    return _terms((chosen - rejected - 1 / (2 * beta)) ** 2, beta, policy, ref)


def dpo_sft(model, batch: dict, reference, beta: float = 0.1, sft_weight: float = 1.0, label_smoothing: float = 0.0):
    """DPO plus ``sft_weight`` x the chosen answer's negative log-likelihood per token (RPO, Pang et al., 2024)."""
    policy, ref, tokens = pair_logps(model, batch, reference)
    dpo_losses = sigmoid_losses(policy, ref, beta, label_smoothing)
    nll = -policy[0] / tokens[0].clamp(min=1)
    terms = _terms(dpo_losses + sft_weight * nll, beta, policy, ref)
    return {**terms, "dpo": dpo_losses.detach().sum(), "sft_nll": nll.detach().sum()}


for _loss in (dpo, ipo, dpo_sft):
    _loss.unit = "pairs"  # the loop normalises their sums by the global batch's pairs
