"""WMPO — World-Model-based Policy Optimization (arXiv 2511.09515), small enough to read in one sitting.

The method, top to bottom:
    1. VLA            a vision-language-action policy: 64x64 frame + instruction -> a chunk of K actions as
                      discrete tokens (256 bins per dim), decoded in parallel (OpenVLA-OFT's scheme, tiny)
    2. FrameCodec     per-frame conv autoencoder: 64x64x3 pixels <-> a small latent grid (the paper's 2D VAE)
    3. WorldModel     action-conditioned video model over latent frame tokens: 4 context frames -> the next K
                      frames from K actions, frame-causal attention, per-frame AdaLN action conditioning,
                      rectified flow with noisy-context conditioning; also an env (reset / step)
    4. RewardModel    success classifier on 8-frame clips, run on every frame of an imagined rollout (stride 1)
    5. GRPO           group advantages + clipped surrogate from kernels/grpo.py, trained in imagination
Checkpoints: weights in safetensors with the model config as JSON in the metadata (`save`, `load`).

Ein legend (every reshape uses these letters):
    b batch   g group   t frames   c h w pixels   p patch   n tokens   d dim   a action dim   k chunk steps
    v action bins   l instruction words
Frames are uint8 [0, 255] in data and float [-1, 1] in models.
"""

import json
import os
import time
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
import torch
import torch._dynamo  # noqa: F401  (before any MuJoCo renderer: see envs.py)
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import ddp
import envs

# Denormal floats (|x| < 1e-38) make CPU convolutions 10-50x slower; gradients of near-constant latents produce them
# (measured: 2.6 s vs 0.2 s per world-model step on a one-blob latent). Flushing them to zero changes no result.
torch.set_flush_denormal(True)

# ----------------------------------------------------------------------------------------------------------
# instructions -> word ids, with no download: a new model's vocabulary is every word the task grammar can produce.
# The word list then travels with the checkpoint (safetensors metadata "vocab"): adding a task's words to the
# templates re-sorts VOCAB, and an old checkpoint must keep decoding its own ids (issue 15).


def build_vocab() -> list[str]:
    words = set()
    for tmpl in envs.REACH_TEMPLATES + envs.PUSH_TEMPLATES + envs.PUSH_TWO_TEMPLATES:
        words.update(tmpl.replace(",", " ").split())
    words.update(c for c in envs.COLORS)
    words = {w for w in words if not w.startswith("{")}
    return ["<pad>", "<unk>"] + sorted(words)


VOCAB = build_vocab()
PAD, UNK = 0, 1


def tokenize(instructions: list[str], words: list[str], max_len: int = 24) -> torch.Tensor:
    """Word ids (b, l) in the vocabulary `words`, padded with PAD; unknown words map to UNK (never an error)."""
    word_id = {w: i for i, w in enumerate(words)}
    ids = torch.full((len(instructions), max_len), PAD, dtype=torch.long)
    for i, text in enumerate(instructions):
        toks = text.lower().replace(",", " ").split()[:max_len]
        ids[i, : len(toks)] = torch.tensor([word_id.get(w, UNK) for w in toks], dtype=torch.long)
    return ids


def detokenize(ids: torch.Tensor, words: list[str]) -> list[str]:
    return [" ".join(words[i] for i in row.tolist() if i != PAD) for row in ids]


# ----------------------------------------------------------------------------------------------------------
# actions <-> tokens: 256 uniform bins over [-1, 1] per dimension (actions are already normalised to [-1, 1])


def action_to_tokens(actions: torch.Tensor, bins: int = 256) -> torch.Tensor:
    return torch.round((actions.clamp(-1, 1) + 1) / 2 * (bins - 1)).long()


def tokens_to_action(tokens: torch.Tensor, bins: int = 256) -> torch.Tensor:
    return tokens.float() / (bins - 1) * 2 - 1  # bin centres; round trip error <= half a bin = 1 / (bins - 1)


def gauss_targets(tokens: torch.Tensor, bins: int, sigma: float) -> torch.Tensor:
    """HL-Gauss (Imani & White 2018): the mass N(token, sigma) puts on each bin (sigma in bins), renormalised over
    the range so the end bins keep theirs. tokens (...) -> target distributions (..., bins)."""
    edges = torch.arange(bins + 1, device=tokens.device) - 0.5
    mass = torch.special.ndtr((edges - tokens[..., None].float()) / sigma).diff(dim=-1)
    return mass / mass.sum(-1, keepdim=True)


def frames_to_model(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., h, w, c) -> float (..., c, h, w) in [-1, 1]."""
    return rearrange(frames, "... h w c -> ... c h w").float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------
# 1. VLA policy


@dataclass
class PolicyConfig:
    chunk: int = 8  # K actions per call (the paper's 8)
    action_dim: int = 2  # a: action dimensions (the pusher's x, y velocity set-point)
    bins: int = 256  # discrete bins per action dimension (the paper's 256)
    width: int = 32  # conv channels (64 is 4x slower on CPU for little gain at 64x64)
    keypoints: int = 32  # spatial-softmax keypoints
    text_dim: int = 64  # word embedding and GRU width
    hidden: int = 512  # MLP head width
    execute: int = 2
    """actions of each chunk run before the policy looks again (<= chunk; eval, rollouts and GRPO all use it); 2 vs 8:
    +11 / +6 / +1 points of base-policy success on Reach / PushCube / PushTwo (issue 15)"""
    decoding: str = "parallel"
    """parallel: every token from one pass (OpenVLA-OFT); autoregressive: token i also sees the chunk's tokens < i
    (OpenVLA's order: action by action, x then y), so a sampled chunk follows its own first choices"""
    sampling: str = "independent"
    """independent: each token drawn on its own; shared: one uniform draw u per action dimension per chunk, read
    through every token's CDF (each token keeps its own marginal; the whole chunk lands at one quantile, so a group's
    samples differ in where the chunk goes, not in per-step jitter). Parallel decoding only; GRPO's ratio then
    uses the exact probability of the executed tokens (shared_logprob)"""


class FiLM(nn.Module):
    """Feature-wise modulation of conv features by the instruction: the words decide which colour to look at."""

    def __init__(self, text_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(text_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, text):
        gamma, beta = rearrange(self.proj(text), "b (two d) -> two b d 1 1", two=2)
        return x * (1 + gamma) + beta


def spatial_softmax(x: torch.Tensor) -> torch.Tensor:
    """Keypoints: each channel's softmax over pixels -> the expected (x, y) in [-1, 1]. (b, n, h, w) -> (b, n, 2)."""
    b, n, h, w = x.shape
    attn = rearrange(x, "b n h w -> b n (h w)").softmax(-1)
    gy, gx = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                            indexing="ij")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)  # (h*w, 2)
    return attn @ grid


class TextEncoder(nn.Module):
    """Instruction -> one vector: word embeddings + a bidirectional GRU (word order matters: "red ... then blue").
    Shared by the policy and the reward model. It owns its word list (`words`), saved in every checkpoint that
    holds one (checkpoints from before this module, with top-level `embed.*` names and no "vocab", do not load)."""

    def __init__(self, words: list[str], dim: int):
        super().__init__()
        self.words = list(words)
        self.embed = nn.Embedding(len(self.words), dim, padding_idx=PAD)
        self.gru = nn.GRU(dim, dim, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * dim, dim)

    def tokenize(self, instructions: list[str]) -> torch.Tensor:
        """Instruction strings -> word ids (b, l) in this encoder's own vocabulary, on its device."""
        return tokenize(instructions, self.words).to(self.embed.weight.device)

    def forward(self, ids):  # (b, l) -> (b, d)
        ids, row = torch.unique(ids, dim=0, return_inverse=True)  # a batch repeats a few instructions: run each once
        lengths = (ids != PAD).sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)  # h: (2, u, d), last state of each direction
        return self.out(rearrange(h, "two u d -> u (two d)"))[row]


class VLA(nn.Module):
    """Frame + instruction -> K x A action tokens, all decoded in one forward pass (parallel decoding).

    Vision: convs FiLM-conditioned on the instruction, then spatial-softmax keypoints (a plain conv+flatten
    encoder could not clone the expert from pixels in the prototype; keypoints give ~2 px precise positions).
    Language: TextEncoder (word embeddings + a bidirectional GRU).
    """

    def __init__(self, cfg: PolicyConfig, words: list[str] = VOCAB):
        super().__init__()
        if not 1 <= cfg.execute <= cfg.chunk:
            raise ValueError(f"--policy.execute must be in 1..{cfg.chunk} (the chunk), got {cfg.execute}")
        if cfg.decoding not in ("parallel", "autoregressive"):
            raise ValueError(f"--policy.decoding must be parallel or autoregressive, got {cfg.decoding!r}")
        self.cfg = cfg
        w, td = cfg.width, cfg.text_dim
        self.text = TextEncoder(words, td)
        self.conv1 = nn.Conv2d(3 + 2, w, 5, stride=2, padding=2)  # +2: pixel coordinates (CoordConv)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1)
        self.film2 = FiLM(td, w)
        self.conv3 = nn.Conv2d(w, w, 3, padding=1)
        self.film3 = FiLM(td, w)
        self.conv4 = nn.Conv2d(w, cfg.keypoints, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(2 * cfg.keypoints + td, cfg.hidden), nn.GELU(),
                                  nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(),
                                  nn.Linear(cfg.hidden, cfg.chunk * cfg.action_dim * cfg.bins))
        if cfg.decoding == "autoregressive":  # token j's bin adds a learned vector to the features every token
            n = cfg.chunk * cfg.action_dim  # after j reads: logits_i = W_i (h + sum_{j<i} prev[j, tok_j]) + b_i
            self.prev = nn.Embedding(n * cfg.bins, cfg.hidden)
            nn.init.zeros_(self.prev.weight)  # starts as the parallel head

    def logits(self, frames: torch.Tensor, words: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """frames uint8 (b, h, w, c), words (b, l) -> logits (b, k*a, v). Autoregressive decoding: each token's
        logits given the `tokens` (b, k*a) before it (teacher forcing); without tokens, the features (b, d)."""
        x = frames_to_model(frames)
        b, c, h, w = x.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                                indexing="ij")
        x = torch.cat([x, repeat(torch.stack([xs, ys]), "two h w -> b two h w", b=b)], dim=1)
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's conv layout: CPU fwd+bwd ~15-20% faster
        text = self.text(words)
        x = F.gelu(self.conv1(x))  # (b, d, 32, 32)
        x = F.gelu(self.film2(self.conv2(x), text))
        x = F.gelu(self.film3(self.conv3(x), text))
        x = self.conv4(x)  # (b, keypoints, 32, 32)
        feats = torch.cat([rearrange(spatial_softmax(x), "b n two -> b (n two)"), text], dim=-1)
        if self.cfg.decoding == "parallel":
            return rearrange(self.head(feats), "b (ka v) -> b ka v", v=self.cfg.bins)
        z = self.head[:-1](feats)  # (b, d)
        if tokens is None:
            return z
        emb = self.prev(tokens + torch.arange(tokens.shape[1], device=tokens.device) * self.cfg.bins)  # (b, n, d)
        before = F.pad(emb[:, :-1], (0, 0, 1, 0)).cumsum(1)  # token i: the sum over j < i, exactly (not cumsum - emb)
        return self.token_logits(z[:, None] + before, slice(None))

    def token_logits(self, z, i):
        """The last layer for tokens i (an index or slice): z (b, n, d) or (b, d) -> logits (b, n, v) or (b, v)."""
        W = rearrange(self.head[-1].weight, "(n v) d -> n v d", v=self.cfg.bins)[i]
        bias = rearrange(self.head[-1].bias, "(n v) -> n v", v=self.cfg.bins)[i]
        return torch.einsum("...d,...vd->...v", z, W) + bias

    @torch.no_grad()
    def act(self, frames: torch.Tensor, words: torch.Tensor, temperature: float = 0.0):
        """Sample (temperature > 0) or take the argmax (0) of every token (autoregressive: one after another).

        Returns (actions (b, k, a) in [-1, 1], tokens (b, k*a), logp (b,)): logp is the exact log-probability of
        the chosen tokens under the distribution they were drawn from (softmax(logits / temperature); T=1 for
        greedy), the sum over the chunk's K*A tokens (paper eq. 3), or over its A dimensions (shared sampling).
        """
        if self.cfg.sampling not in ("independent", "shared") or (self.cfg.sampling == "shared" and
                                                                   self.cfg.decoding != "parallel"):
            raise ValueError(f"sampling must be independent or shared (shared: parallel decoding only), got "
                             f"{self.cfg.sampling!r} with {self.cfg.decoding} decoding")
        if self.cfg.decoding == "autoregressive":  # token by token, each drawn given the ones before it
            z, toks, logp, T = self.logits(frames, words), [], 0.0, temperature if temperature > 0 else 1.0
            for i in range(self.cfg.chunk * self.cfg.action_dim):
                lp = (self.token_logits(z, i) / T).log_softmax(-1)  # (b, v)
                toks.append(torch.multinomial(lp.exp(), 1)[:, 0] if temperature > 0 else lp.argmax(-1))
                logp = logp + lp.gather(-1, toks[-1][:, None])[:, 0]
                z = z + self.prev(toks[-1] + i * self.cfg.bins)
            tokens = torch.stack(toks, 1)
        else:
            A, shared = self.cfg.action_dim, temperature > 0 and self.cfg.sampling == "shared"
            logits = self.logits(frames, words) / (temperature if temperature > 0 else 1.0)
            logp_all = logits.log_softmax(-1)
            if shared:  # each token: the bin whose CDF interval holds its action dimension's one draw u
                cdf = rearrange(logp_all.exp().cumsum(-1), "b (k a) v -> b k a v", a=A)
                u = torch.rand(cdf.shape[0], 1, A, 1, device=cdf.device)
                tokens = rearrange((cdf <= u).sum(-1).clamp(max=self.cfg.bins - 1), "b k a -> b (k a)")
            elif temperature > 0:
                tokens = torch.multinomial(rearrange(logp_all.exp(), "b n v -> (b n) v"), 1)
                tokens = rearrange(tokens, "(b n) 1 -> b n", b=logits.shape[0])
            else:
                tokens = logits.argmax(-1)
            logp = (shared_logprob(logits, tokens, A) if shared else logp_all.gather(-1, tokens[..., None])[..., 0])
            logp = logp.sum(-1)
        actions = rearrange(tokens_to_action(tokens, self.cfg.bins), "b (k a) -> b k a", a=self.cfg.action_dim)
        return actions, tokens, logp

    def logprob(self, frames, words, tokens, temperature: float = 1.0, per_token: bool = False, mask=None):
        """Log-probability of given tokens (b, k*a), with gradients: (b,) summed, or per unit with per_token: (b, k*a)
        tokens, or under shared sampling (b, a) action dimensions, of the tokens with `mask` (b, k*a) True only."""
        logits = self.logits(frames, words, tokens) / max(temperature, 1e-6)
        if self.cfg.sampling == "shared":
            lp = shared_logprob(logits, tokens, self.cfg.action_dim, mask)
        else:
            lp = logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
        return lp if per_token else lp.sum(-1)

    def entropy(self, frames, words, temperature: float = 1.0, tokens=None):
        """Mean per-token entropy (nats), for logging (autoregressive: of each token given the `tokens` before it)."""
        logp_all = (self.logits(frames, words, tokens) / max(temperature, 1e-6)).log_softmax(-1)
        return -(logp_all.exp() * logp_all).sum(-1).mean()

    def forward(self, frames, words, tokens, token_mask, token_count: float | None = None, sigma: float = 0.0):
        """SFT: cross-entropy on the action tokens (one-hot, or HL-Gauss targets of std `sigma` bins), averaged over
        `token_count` tokens (default: the batch's valid ones; under DDP the global count / world size, so the
        averaged gradient equals one process's). (loss, logs)."""
        logits = self.logits(frames, words, tokens)
        ce = (-(gauss_targets(tokens, self.cfg.bins, sigma) * logits.log_softmax(-1)).sum(-1).reshape(-1) if sigma > 0
              else F.cross_entropy(rearrange(logits, "b n v -> (b n) v"), tokens.reshape(-1), reduction="none"))
        m = token_mask.reshape(-1).float()
        loss = (ce * m).sum() / (m.sum().clamp(min=1) if token_count is None else token_count)
        acc = ((logits.argmax(-1).reshape(-1) == tokens.reshape(-1)).float() * m).sum() / m.sum().clamp(min=1)
        # within one bin either side: a finer accuracy than exact-token match for 256 bins
        near = (((logits.argmax(-1) - tokens).abs().reshape(-1) <= 2).float() * m).sum() / m.sum().clamp(min=1)
        return loss, {"sft/loss": loss.item(), "sft/token_acc": acc.item(), "sft/token_acc_2bins": near.item()}


def shared_logprob(logits: torch.Tensor, tokens: torch.Tensor, A: int, mask: torch.Tensor | None = None):
    """Exact log-probability of tokens drawn with one uniform u per action dimension (VLA sampling "shared"): the
    measure of the u in every token's CDF interval [P(token < v), P(token <= v)). Tokens with mask False (actions
    never executed) constrain nothing. logits (b, k*a, v) already divided by the temperature -> (b, a)."""
    cdf = F.pad(logits.log_softmax(-1).exp().cumsum(-1), (1, 0))  # the sampler's own CDF, cdf[v] = P(token < v)
    lo, hi = cdf.gather(-1, tokens[..., None])[..., 0], cdf.gather(-1, tokens[..., None] + 1)[..., 0]
    if mask is not None:
        lo, hi = lo.masked_fill(~mask.bool(), 0.0), hi.masked_fill(~mask.bool(), 1.0)
    lo, hi = (rearrange(x, "b (k a) -> b k a", a=A) for x in (lo, hi))
    # an empty intersection (the new policy no longer allows this chunk) gets a tiny probability, not log(0)
    return (hi.min(1).values - lo.max(1).values).clamp(min=1e-12).log()


def policy_fn(policy: VLA, temperature: float, device="cpu"):
    """An envs.collect policy callable: runs the VLA on a batch of observations, returns action chunks."""

    def fn(obs, instructions, venv):
        frames = torch.as_tensor(obs, device=device)
        actions, _, _ = policy.act(frames, policy.text.tokenize(instructions), temperature)
        return actions[:, : policy.cfg.execute].cpu().numpy()  # re-plan after `execute` actions

    return fn


# ----------------------------------------------------------------------------------------------------------
# 2. frame codec: 64x64x3 pixels <-> a 16x16 grid of `latent_ch` channels (the paper's per-frame 2D VAE, as an AE)
#
# 16x16 cells of 4x4 px: the ~5 px pusher and ~6 px blocks span one or two cells, and a step moves the pusher by at
# most ~1 cell, so "move this blob by the action" is a local operation that convolutions learn. (The first world
# model used 8x8 cells of 8 px with 2x2-cell tokens, i.e. 16x16 px per token, and came out action-blind.)


@dataclass
class CodecConfig:
    width: int = 32
    """conv channels at 32x32 (2x at 16x16)"""
    latent_ch: int = 8
    """latent grid (latent_ch, 16, 16): 2,048 numbers per 12,288-value frame"""
    object_weight: float = 20.0
    """extra reconstruction weight on non-table pixels: 5 px objects must not wash out"""
    latent_noise: float = 0.05
    """noise on latents in training: the decoder must tolerate imperfect predictions"""
    table_rgb: tuple[float, float, float] = (-0.5, -0.5, -0.5)  # derived: table colour in [-1, 1], measured from data


class FrameCodec(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.cfg = cfg
        w, z = cfg.width, cfg.latent_ch
        self.enc = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.GELU(),  # 32x32
            nn.Conv2d(w, 2 * w, 3, 1, 1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 4, 2, 1), nn.GELU(),  # 16x16
            nn.Conv2d(2 * w, z, 3, 1, 1),
        )  # fmt: skip
        self.dec = nn.Sequential(
            nn.Conv2d(z, 2 * w, 3, 1, 1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.GELU(),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.GELU(),  # 32x32
            nn.Conv2d(w, w, 3, 1, 1), nn.GELU(),
            nn.ConvTranspose2d(w, 3, 4, 2, 1),  # 64x64
        )  # fmt: skip

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (..., h, w, c) -> latents (..., z, 16, 16) in [-1, 1] (tanh: the dynamics' residuals stay bounded)."""
        lead = frames.shape[:-3]
        x = frames_to_model(frames.reshape(-1, *frames.shape[-3:]))
        z = torch.tanh(self.enc(x))
        return z.reshape(*lead, *z.shape[1:])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (..., z, 16, 16) -> float pixels (..., 3, 64, 64) in [-1, 1]."""
        lead = latents.shape[:-3]
        z = latents.reshape(-1, *latents.shape[-3:]).contiguous(memory_format=torch.channels_last)  # ~1/3 faster
        return self.dec(z).reshape(*lead, 3, 64, 64)

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        """float (..., c, h, w) in [-1, 1] -> uint8 (..., h, w, c): imagined frames are quantised like real ones."""
        return rearrange(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), "... c h w -> ... h w c")

    def forward(self, frames):
        x = frames_to_model(frames)  # (b, c, h, w)
        z = torch.tanh(self.enc(x))
        recon = self.dec(z + self.cfg.latent_noise * torch.randn_like(z))
        table = torch.tensor(self.cfg.table_rgb, device=x.device)[None, :, None, None]
        is_object = ((x - table).abs().sum(1, keepdim=True) > 0.15).float()
        weight = 1 + self.cfg.object_weight * is_object
        loss = (weight * (recon - x) ** 2).mean()
        mse = F.mse_loss(recon.clamp(-1, 1), x)
        return loss, {"codec/loss": loss.item(), "codec/psnr": (10 * torch.log10(4 / mse)).item()}


# ----------------------------------------------------------------------------------------------------------
# 3. world model: deterministic next-latent dynamics on the 16x16 grid, actions in every block, frames seeing each
#    other through frame-causal attention over 8x8 tokens (kernels/frame_attention.py), unrolled in training
#
# Why this design (measured, README "World model" and ../shared/notes/world-model.md): a flow DiT over 16 coarse
# tokens per frame with actions only in AdaLN ignored its actions; a conv net on a 16x16 latent with the actions
# tiled as input channels and as FiLM in every block follows them to ~1 px over 40 steps. Contact (a pushed block)
# is the hard part: the block's motion depends on where the pusher was over the last frames, which the attention
# over earlier frames and the previous latent (a motion channel) supply.


@dataclass
class WorldModelConfig:
    # -- shapes: the codec's latent, the paper's 4 context -> 8 generated frames, the task's actions --
    latent_ch: int = 8  # channels of the codec's 16x16 latent
    context: int = 4
    """context frames before a chunk (the paper's 4); a rollout starts from one real frame repeated 4 times under
    zero actions, the pusher at rest"""
    chunk: int = 8  # frames generated per step() call, one per action (the paper's 8)
    action_dim: int = 2  # action dimensions (the pusher's x, y)
    # -- network --
    history: int = 4
    """actions tiled per frame: its own and the previous history-1; the pusher lags its set-point, so where it is
    now depends on the last few actions, not only on this one"""
    width: int = 48  # conv channels at 16x16
    d: int = 96  # channels at 8x8 = the attention token width
    n_res: int = 1  # ResBlocks at each level (16x16 down, 8x8, 16x16 up)
    n_layer: int = 2
    """frame-causal attention blocks over the 8x8 tokens of all frames so far"""
    n_head: int = 3
    """attention heads; the head dim d / n_head must be 16, 32, 64 or 128 (kernels/frame_attention.py's tl.dot
    tiles)"""
    # -- training --
    ctx_noise: float = 0.05
    """Gaussian noise on input latents in training: generated context is never exactly on the data manifold"""
    max_residual: float = 1.0
    """the next latent is the input latent plus a residual clamped to +-max_residual (stable long unrolls)"""
    motion_weight: float = 5.0
    """extra loss weight on latent cells that change (moving pixels are ~1% of a frame: copy is a deep minimum)"""
    gate: bool = False
    """multiply the residual by a predicted per-cell gate in (0, 1): a cell nothing touches can copy itself exactly"""
    context_from: str = "frames"
    """what a generated chunk becomes as the next chunk's context, in imagination and in unrolled training alike:
    frames (decoded, quantised to uint8 and re-encoded: back on the codec's manifold, a decode + encode per chunk)
    or latents (the model's own predictions, no codec in the loop)"""

    @property
    def frame_tokens(self) -> int:
        return 64  # 8x8 tokens per frame at the attention level


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv (input + tiled actions) -> FiLM(actions) -> GroupNorm -> SiLU -> conv, residual.
    The actions enter twice on purpose: as channels (a local "move by this" signal every conv sees) and as a
    modulation with its own projection (a global gain); main's AdaLN-only path was not enough."""

    def __init__(self, ch: int, act_ch: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, ch)
        self.conv1 = nn.Conv2d(ch + act_ch, ch, 3, padding=1)
        self.film = nn.Linear(act_ch, 2 * ch)
        self.norm2 = nn.GroupNorm(8, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, act):  # x (n, ch, h, w), act (n, f) the frame's action features
        tiles = repeat(act, "n f -> n f h w", h=x.shape[2], w=x.shape[3])
        h = self.conv1(torch.cat([F.silu(self.norm1(x)), tiles], 1))
        gamma, beta = rearrange(self.film(act), "n (two c) -> two n c 1 1", two=2)
        h = h * (1 + gamma) + beta
        return x + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Pre-LN transformer block over the 8x8 tokens of every frame; a token of frame t sees frames 0..t."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        d = cfg.d
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.mlp[2].weight)

    def forward(self, x, cache=None):
        """x (b, t*n, d) tokens of t new frames; cache (k, v) of the frames before them or None.
        Returns (x, (k, v)) with the keys/values of all frames so far."""
        from kernels.frame_attention import frame_attention, frame_attention_rollout, frame_attention_rollout_ref

        q, k, v = rearrange(self.qkv(self.ln1(x)), "b n (three nh dh) -> three b nh n dh", three=3, nh=self.n_head)
        if cache is None:  # training / context: one pass over all frames, the kernel with its backward
            a = frame_attention(q, k, v, 64)
        else:  # generation: new frames against the cache + themselves
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            offset = cache[0].shape[2] // 64
            # the rollout kernel is forward-only; an unrolled training step (grads on) takes the reference
            attend = frame_attention_rollout if not torch.is_grad_enabled() else frame_attention_rollout_ref
            a = attend(q, k, v, 64, offset)
        x = x + self.proj(rearrange(a, "b nh n dh -> b n (nh dh)"))
        x = x + self.mlp(self.ln2(x))
        return x, (k, v)


class WorldModel(nn.Module):
    """z_{t+1} = z_t + clamp(f(z_<=t, a_<=t)): the next 16x16 latent from every frame so far and its actions.

    Per frame (convs, no time mixing): [z_t, z_t - z_{t-1}, tiled actions] -> ResBlocks at 16x16 -> stride-2 conv
    -> ResBlocks at 8x8. Across frames: frame-causal attention over the 8x8 tokens (64 per frame). Back per frame:
    upsample, concat the 16x16 skip, ResBlocks -> residual. Deterministic: the loss is a motion-weighted MSE, first
    teacher-forced over a whole window (one parallel pass), then unrolled on its own predictions (`unroll`), which
    is what the model faces in imagination.
    """

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        if cfg.context_from not in ("frames", "latents"):
            raise ValueError(f"WorldModelConfig.context_from must be 'frames' or 'latents', got {cfg.context_from!r}")
        self.cfg = cfg
        c, w, d, f = cfg.latent_ch, cfg.width, cfg.d, cfg.history * cfg.action_dim
        self.act_mlp = nn.Sequential(nn.Linear(f, 64), nn.SiLU(), nn.Linear(64, f))
        self.stem = nn.Conv2d(2 * c + f, w, 3, padding=1)
        self.down_res = nn.ModuleList([ResBlock(w, f) for _ in range(cfg.n_res)])
        self.down = nn.Conv2d(w, d, 4, 2, 1)  # 16x16 -> 8x8
        self.mid_res = nn.ModuleList([ResBlock(d, f) for _ in range(cfg.n_res)])
        self.pos_space = nn.Parameter(0.02 * torch.randn(cfg.frame_tokens, d))
        self.pos_time = nn.Parameter(0.02 * torch.randn(cfg.context + cfg.chunk, d))
        self.act_tok = nn.Linear(f, d)
        self.blocks = nn.ModuleList([AttnBlock(cfg) for _ in range(cfg.n_layer)])
        self.up = nn.ConvTranspose2d(d, w, 4, 2, 1)  # 8x8 -> 16x16
        self.merge = nn.Conv2d(2 * w + f, w, 3, padding=1)
        self.up_res = nn.ModuleList([ResBlock(w, f) for _ in range(cfg.n_res)])
        self.out = nn.Conv2d(w, c + int(cfg.gate), 3, padding=1)
        nn.init.zeros_(self.out.weight)  # starts as copy-the-last-frame; the actions must earn every change
        nn.init.zeros_(self.out.bias)

    def action_features(self, actions: torch.Tensor) -> torch.Tensor:
        """(b, t, a) the action taken at each frame -> (b, t, history*a): it and the previous history-1 (0 before)."""
        past = [F.pad(actions, (0, 0, i, 0))[:, : actions.shape[1]] for i in range(self.cfg.history)]
        return torch.cat(past, -1)

    def frames_in(self, z, z_prev, af, t0):
        """Per-frame encoder. z, z_prev (b, t, c, h, w), af (b, t, f) -> tokens (b, t*64, d), skips (b*t, w, 16, 16)."""
        b, t = z.shape[:2]
        af = rearrange(af, "b t f -> (b t) f")
        emb = self.act_mlp(af) + af
        tiles = repeat(af, "n f -> n f h w", h=z.shape[-2], w=z.shape[-1])
        zf, zp = rearrange(z, "b t c h w -> (b t) c h w"), rearrange(z_prev, "b t c h w -> (b t) c h w")
        h = self.stem(torch.cat([zf, zf - zp, tiles], 1))
        for blk in self.down_res:
            h = blk(h, emb)
        skip = h
        h = self.down(F.silu(h))
        for blk in self.mid_res:
            h = blk(h, emb)
        tok = rearrange(h, "(b t) d h w -> b t (h w) d", b=b) + self.pos_space + self.pos_time[t0 : t0 + t, None]
        tok = tok + rearrange(self.act_tok(emb), "(b t) d -> b t 1 d", b=b)
        return rearrange(tok, "b t n d -> b (t n) d"), skip, emb

    def frames_out(self, tok, skip, emb, z, af):
        """Per-frame decoder: tokens (b, t*64, d) + skips -> next latents (b, t, c, h, w)."""
        b, t = z.shape[:2]
        h = rearrange(tok, "b (t hh ww) d -> (b t) d hh ww", t=t, hh=8)
        tiles = repeat(rearrange(af, "b t f -> (b t) f"), "n f -> n f h w", h=16, w=16)
        h = self.merge(torch.cat([F.silu(self.up(h)), skip, tiles], 1))
        for blk in self.up_res:
            h = blk(h, emb)
        res = self.out(F.silu(h))
        if self.cfg.gate:  # (n, c + 1, h, w): the last channel says where anything changes at all
            res = res[:, :-1] * torch.sigmoid(res[:, -1:])
        res = res.clamp(-self.cfg.max_residual, self.cfg.max_residual)
        return (z + rearrange(res, "(b t) c h w -> b t c h w", b=b)).clamp(-1, 1)  # the codec's range (tanh)

    def next_latents(self, z, z_prev, af, caches=None, t0: int = 0):
        """The prediction of frame t+1 for each given frame t. z (b, t, ...) the frames, z_prev their predecessors,
        af (b, t, f) their action features; caches: per-layer (k, v) of the t0 frames before them, or None.
        Returns (next latents (b, t, c, h, w), caches of all t0 + t frames)."""
        tok, skip, emb = self.frames_in(z, z_prev, af, t0)
        new_caches = []
        for i, blk in enumerate(self.blocks):
            tok, kv = blk(tok, None if caches is None else caches[i])
            new_caches.append(kv)
        return self.frames_out(tok, skip, emb, z, af), new_caches

    def unroll(self, z_ctx, ctx_actions, actions, z_real=None, reset_every: int = 0):
        """Generate K latents after a context, each fed back as the next input (with the KV cache).

        z_ctx (b, C, c, h, w); ctx_actions (b, C-1, a) the actions taken at the first C-1 context frames;
        actions (b, K, a): actions[:, j] is taken at the frame before generated frame j. With z_real (b, K, ...) and
        reset_every H > 0, every H-th input is the real frame instead (the unroll curriculum's H-step segments).
        Returns (b, K, c, h, w)."""
        C, K = z_ctx.shape[1], actions.shape[1]
        af = self.action_features(torch.cat([ctx_actions, actions], 1))  # (b, C+K-1, f)
        z_prev = torch.cat([z_ctx[:, :1], z_ctx[:, :-1]], 1)
        nxt, caches = self.next_latents(z_ctx, z_prev, af[:, :C], None, 0)
        preds, last = [nxt[:, -1:]], z_ctx[:, -1:]
        for j in range(1, K):
            reset = z_real is not None and reset_every > 0 and j % reset_every == 0
            inp = z_real[:, j - 1 : j] if reset else preds[-1]
            nxt, caches = self.next_latents(inp, last, af[:, C - 1 + j : C + j], caches, C + j - 1)
            preds.append(nxt)
            last = inp
        return torch.cat(preds, 1)

    def next_context(self, ctx, chunk, codec=None, pixels=None):
        """The C context latents after a generated chunk (b, K, c, h, w): the last C of ctx + chunk, as
        cfg.context_from says (frames: via uint8 pixels, straight-through rounding; `pixels` saves a decode)."""
        if self.cfg.context_from == "frames":  # only the chunk's last C frames can stay: re-encode just those
            if codec is None:
                raise ValueError("context_from='frames' re-encodes each chunk's frames: pass the codec")
            chunk = chunk[:, -self.cfg.context :]
            x = (codec.decode(chunk) if pixels is None else pixels[:, -self.cfg.context :]).clamp(-1, 1)
            x = x + (((x + 1) * 127.5).round() / 127.5 - 1 - x).detach()  # what encode(to_uint8(x)) sees
            chunk = torch.tanh(codec.enc(rearrange(x, "b k c h w -> (b k) c h w"))).reshape(chunk.shape)
        return torch.cat([ctx, chunk], 1)[:, -self.cfg.context :]

    def imagine(self, z_ctx, ctx_actions, actions, z_real=None, reset_every: int = 0, codec=None):
        """n chunks as WorldModelEnv.step generates them: each unrolled after the last C context frames, then turned
        into the next context (next_context). z_ctx (b, C, c, h, w), ctx_actions (b, C-1, a), actions (b, n*K, a);
        z_real, reset_every as in unroll. Returns (b, n*K, c, h, w)."""
        C, K, n, preds = self.cfg.context, self.cfg.chunk, actions.shape[1], []
        acts = torch.cat([ctx_actions, actions], 1)  # acts[:, i]: the action taken at frame i
        for lo in range(0, n, K):
            real = None if z_real is None else z_real[:, lo : lo + K]
            preds.append(self.unroll(z_ctx, acts[:, lo : lo + C - 1], actions[:, lo : lo + K], real, reset_every))
            if lo + K < n:
                z_ctx = self.next_context(z_ctx, preds[-1], codec)
        return torch.cat(preds, 1)

    def forward(self, z, actions, unroll: int = 0, codec=None):
        """Loss on a window. z (b, C+n*K, c, h, w) clean latents, actions (b, C+n*K, a): actions[:, i] taken at
        frame i (the last is unused). unroll = 0: teacher forcing, one parallel pass predicting every frame from the
        real ones before it. unroll = H > 0: the first C frames are real, the n*K after are generated as in
        imagination (`imagine`; codec for context_from='frames'), from the model's own predictions, reset to the
        real frame every H steps inside a chunk. Returns (loss, logs)."""
        C = self.cfg.context
        noisy = z + self.cfg.ctx_noise * torch.randn_like(z)  # generated context is never exact
        if unroll <= 0:
            af = self.action_features(actions[:, :-1])
            z_prev = torch.cat([noisy[:, :1], noisy[:, :-2]], 1)
            pred, _ = self.next_latents(noisy[:, :-1], z_prev, af)
            target, base = z[:, 1:], z[:, :-1]
        else:
            pred = self.imagine(noisy[:, :C], actions[:, : C - 1], actions[:, C - 1 : -1], noisy[:, C:], unroll, codec)
            target, base = z[:, C:], z[:, C - 1 : -1]
        # cells where the real frame changes (any channel) weigh motion_weight more: moving pixels are few
        moving = ((target - base).abs().amax(2, keepdim=True) > 0.05).float()
        err = (pred - target) ** 2
        loss = ((1 + self.cfg.motion_weight * moving) * err).mean()
        copy = ((base - target) ** 2).mean()
        ratio = err.mean() / copy.clamp(min=1e-8)  # < 1: better than copying the last frame
        return loss, {"wm/loss": loss.item(), "wm/mse": err.mean().item(), "wm/mse_vs_copy": ratio.item()}

    predict = torch.no_grad()(imagine)  # a sample is the deterministic unroll, without gradients


class WorldModelEnv:
    """The world model as a batched env, with the real env's interface (envs.RealChunkEnv): start / reset, step, judge.

    reset(frames, instructions) starts from given real frames; step(actions (b, E, a)) -> the E next frames uint8
    (b, E, h, w, c), any E. Imagination takes the path unrolled training takes (`WorldModel.imagine`): C context
    latents, then up to K generated ones, each fed back with the KV cache; the K frames then become the next context
    (`WorldModel.next_context`). The unroll state lives across `step` calls, so four calls of 2 actions give exactly
    the frames of one call of 8 (GRPO steps E = PolicyConfig.execute actions at a time; restarting the context at
    every call was a path training never takes). For GRPO, `starts` (real first frames uint8 (n, h, w, c) and
    their instructions) is the pool start() draws initial states from, and judge() scores a
    trajectory's frames with the reward model: GRPO runs the same code in imagination and in the real env."""

    real_trajectories = 0  # imagination draws nothing from the real env: the budget P counts none of it

    def __init__(self, wm: WorldModel, codec: FrameCodec, device="cpu", reward=None, starts=None):
        self.wm, self.codec, self.device, self.reward, self.starts = wm, codec, device, reward, starts
        self.chunk = wm.cfg.chunk

    def start(self, B: int, G: int):
        """B initial states drawn from the pool, each G times (a group: consecutive rows) -> (frames, instructions)."""
        frames, instr = self.starts
        idx = torch.randint(len(frames), (B,))
        frames0 = frames[idx].repeat_interleave(G, 0)
        instructions = [instr[i] for i in idx.tolist() for _ in range(G)]
        return self.reset(frames0, instructions), instructions

    @torch.no_grad()
    def reset(self, frames: torch.Tensor, instructions: list[str]):
        """frames uint8 (b, h, w, c): real initial frames. The context is the first latent repeated C times with
        zero actions: the pusher at rest, which is also how training windows are padded before an episode starts."""
        self.instructions = instructions
        z0 = self.codec.encode(frames.to(self.device))
        C = self.wm.cfg.context
        self.ctx = repeat(z0, "b c h w -> b t c h w", t=C).contiguous()
        self.ctx_actions = torch.zeros(len(frames), C - 1, self.wm.cfg.action_dim, device=self.device)
        self.new_chunk()
        return frames

    def new_chunk(self):
        """Start a K-frame unroll after the current context: no actions, frames or KV cache yet."""
        self.chunk_actions, self.chunk_latents, self.chunk_pixels, self.caches = [], [], [], None
        self.last, self.pred = None, None

    @torch.no_grad()
    def step(self, actions: torch.Tensor) -> torch.Tensor:
        """actions (b, E, a), any E -> the E imagined frames, uint8 (b, E, h, w, c). One frame per action, exactly
        as WorldModel.unroll generates them (the same ops in the same order, whatever the split into calls)."""
        actions = actions.to(self.device).float()
        C, K, wm = self.wm.cfg.context, self.wm.cfg.chunk, self.wm
        out = []
        for a in actions.unbind(1):
            if len(self.chunk_actions) == K:  # the chunk is complete: it becomes the next context, as in training
                self.ctx = wm.next_context(self.ctx, torch.cat(self.chunk_latents, 1), self.codec,
                                           torch.cat(self.chunk_pixels, 1))
                self.ctx_actions = torch.cat([self.ctx_actions, torch.stack(self.chunk_actions, 1)], 1)[:, -(C - 1) :]
                self.new_chunk()
            j = len(self.chunk_actions)
            self.chunk_actions.append(a)
            af = wm.action_features(torch.cat([self.ctx_actions, torch.stack(self.chunk_actions, 1)], 1))
            if j == 0:  # the context frames in one pass; the last one's prediction is the first generated frame
                z_prev = torch.cat([self.ctx[:, :1], self.ctx[:, :-1]], 1)
                nxt, self.caches = wm.next_latents(self.ctx, z_prev, af[:, :C], None, 0)
                self.pred, self.last = nxt[:, -1:], self.ctx[:, -1:]
            else:  # the previous prediction is the next input (WorldModel.unroll's loop body)
                af_j = af[:, C - 1 + j : C + j]
                nxt, self.caches = wm.next_latents(self.pred, self.last, af_j, self.caches, C + j - 1)
                self.pred, self.last = nxt, self.pred
            self.chunk_latents.append(self.pred)
            self.chunk_pixels.append(self.codec.decode(self.pred))  # (b, 1, c, h, w)
            out.append(self.codec.to_uint8(self.chunk_pixels[-1])[:, 0])  # (b, h, w, c)
        return torch.stack(out, 1)

    @torch.no_grad()
    def judge(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame success (b, t) bool of this episode's frames uint8 (b, t, h, w, c): the reward model's clip
        probability over its threshold (chosen on validation episodes by train_wm.py)."""
        probs = self.reward(frames.to(self.device), self.reward.text.tokenize(self.instructions)).cpu()
        return probs >= self.reward.cfg.threshold

    def close(self):
        pass  # nothing to release: the real env's counterpart closes its simulators


def load_world(run_dir: str, device="cpu", world_model: str = "wm", reward_model: str | None = None, starts=None):
    """The trained world model of a run folder as an env: reset(frames uint8 (b, 64, 64, 3), instructions), then
    step(actions (b, K, 2)) -> imagined frames uint8 (b, K, 64, 64, 3). With a reward model and `starts` it is
    GRPO's world (start, judge); world_model / reward_model name checkpoints (lifelong round r: wm.round<r>)."""
    make = f"python train_wm.py --run-dir {run_dir}"
    get = lambda name, kind: load(  # noqa: E731
        envs.require(os.path.join(run_dir, f"{name}.safetensors"), make), device, expect=kind).eval()
    reward = get(reward_model, "RewardModel") if reward_model else None
    return WorldModelEnv(get(world_model, "WorldModel"), get("codec", "FrameCodec"), device, reward, starts)


def first_frames(run_dir: str, task: str):
    """Imagination's initial states: the first frames uint8 (n, h, w, c) and instructions of the real rollouts
    train_wm.py collected (all rounds so far), so imagination draws nothing more from the real env than the budget
    P already counts (budget.json)."""
    eps = envs.load_dir(os.path.join(run_dir, "data"), f"rollouts-{envs.task_name(task)}")
    if not eps:
        raise SystemExit(f"error: no real rollouts of {task} in {run_dir}/data; make them with: "
                         f"python train_wm.py --run-dir {run_dir}")
    return torch.from_numpy(np.stack([e["frames"][0] for e in eps])), [e["instruction"] for e in eps]


class ImaginedEnv(gym.Env):
    """A gymnasium env inside a trained world model, judged by the trained reward model, so any RL library can train
    in imagination: reset(seed) draws one of the run's real first frames (the rollouts train_wm.py collected, which
    the budget P already counts), step(action [2] in [-1, 1]) -> the imagined next frame uint8 (64, 64, 3), reward
    1 and terminated when the reward model sees success (its clip ending at this frame over its threshold), and
    truncated at the task's horizon: never easier than the real task. info["success"] on every step."""

    metadata = {"render_modes": []}

    def __init__(self, run_dir: str, task: str, device="cpu", world_model: str = "wm", reward_model: str = "reward"):
        self.world = load_world(run_dir, device, world_model, reward_model)
        frames, instructions = first_frames(run_dir, task)
        self.starts = list(zip(frames.numpy(), instructions))
        self.task, self.horizon, self.clip = task, envs.horizon(task), self.world.reward.cfg.clip
        self.observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        frame, self.instruction = self.starts[int(self.np_random.integers(len(self.starts)))]
        self.frames = [self.world.reset(torch.from_numpy(frame)[None], [self.instruction])]  # (1, h, w, c) each
        return frame.copy(), {"success": False}

    def step(self, action):
        a = torch.as_tensor(np.asarray(action, np.float32)).clamp(-1, 1).reshape(1, 1, 2)
        self.frames.append(self.world.step(a)[:, 0].cpu())
        clip = torch.stack(self.frames[-self.clip :], 1)  # the reward model's clip ending at the new frame
        success = bool(self.world.judge(clip)[0, -1])
        truncated = len(self.frames) - 1 >= self.horizon and not success
        return self.frames[-1][0].numpy(), float(success), success, truncated, {"success": success}


# ----------------------------------------------------------------------------------------------------------
# 4. reward model: success classifier on 8-frame clips, run on every frame (stride 1)


@dataclass
class RewardConfig:
    clip: int = 8  # frames per clip (the paper's 8)
    width: int = 32  # conv channels
    keypoints: int = 16  # spatial-softmax keypoints per frame
    text_dim: int = 64  # word embedding and GRU width
    hidden: int = 256  # clip-head MLP width
    threshold: float = 0.5  # chosen on held-out validation episodes by train_wm.py


class RewardModel(nn.Module):
    """P(success at the last frame of each 8-frame clip | frames, instruction).

    The instruction is an input: which block must be on which pad is only in the words. Per-frame features
    (instruction-FiLM'd convs -> spatial-softmax keypoints) are computed once per frame; the clip head reads the
    features of 8 consecutive frames, so scoring every window of a T-frame trajectory costs T frame passes.
    """

    def __init__(self, cfg: RewardConfig, words: list[str] = VOCAB):
        super().__init__()
        self.cfg = cfg
        w, td = cfg.width, cfg.text_dim
        self.text = TextEncoder(words, td)
        self.conv1 = nn.Conv2d(3, w, 5, stride=2, padding=2)  # 32x32
        self.conv2 = nn.Conv2d(w, w, 3, stride=2, padding=1)  # 16x16: 4 px cells, keypoints interpolate below that
        self.film = FiLM(td, w)
        self.conv3 = nn.Conv2d(w, cfg.keypoints, 3, padding=1)
        feat = 2 * cfg.keypoints + cfg.keypoints  # keypoint xy + peak activation per keypoint
        self.head = nn.Sequential(nn.Linear(cfg.clip * feat + td, cfg.hidden), nn.GELU(),
                                  nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 1))

    def frame_features(self, frames, text):
        """frames uint8 (b, t, h, w, c), text (b, d) -> (b, t, f)."""
        b, t = frames.shape[:2]
        x = frames_to_model(rearrange(frames, "b t h w c -> (b t) h w c"))
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.film(self.conv2(x), repeat(text, "b d -> (b t) d", t=t)))
        x = self.conv3(x)
        kp = spatial_softmax(x)  # (bt, n, 2)
        feats = torch.cat([kp[..., 0], kp[..., 1], x.flatten(2).amax(-1)], -1)  # + how strongly each keypoint fires
        return rearrange(feats, "(b t) f -> b t f", b=b)

    def clip_logits(self, frames, words):
        """Logit of success for the clip ending at every frame (clips before frame 7 repeat the first frame)."""
        text = self.text(words)
        f = self.frame_features(frames, text)  # (b, t, f)
        L = self.cfg.clip
        f = torch.cat([f[:, :1].expand(-1, L - 1, -1), f], 1)  # left-pad by repeating the first frame
        windows = rearrange(f.unfold(1, L, 1), "b t f l -> b t (l f)")  # (b, t, L*f)
        text_t = repeat(text, "b d -> b t d", t=windows.shape[1])
        return self.head(torch.cat([windows, text_t], -1))[..., 0]

    def forward(self, frames, words, labels=None):
        """Success probability of the clip ending at each frame: (b, t). Called as reward(frames, words).
        With labels, the training loss instead (so DistributedDataParallel, which hooks forward, can wrap it)."""
        return self.loss(frames, words, labels) if labels is not None else self.clip_logits(frames, words).sigmoid()

    def loss(self, frames, words, labels):
        """Clip classification: frames (b, 8, h, w, c), labels (b,) in {0, 1}. Returns (loss, logs)."""
        logits = self.clip_logits(frames, words)[:, -1]
        loss = F.binary_cross_entropy_with_logits(logits, labels.float())
        acc = ((logits > 0) == labels.bool()).float().mean()
        return loss, {"reward/loss": loss.item(), "reward/acc": acc.item()}


def detect_success(probs: torch.Tensor, threshold: float, valid: torch.Tensor | None = None):
    """Trajectory verdict from per-frame clip probabilities (b, t): success if any window is over the threshold;
    finish = the first such frame (GRPO masks the policy's tokens after it), or t - 1 when there is none."""
    hit = probs >= threshold
    if valid is not None:
        hit &= valid
    success = hit.any(1)
    first = torch.where(success, hit.float().argmax(1), torch.full_like(success, probs.shape[1] - 1, dtype=torch.long))
    return success, first


# ----------------------------------------------------------------------------------------------------------
# 4b. training data for the world and reward models, and the loop they train with (train_wm.py, lifelong rounds)


class Windows:
    """Random (C context + K future) latent windows of real episodes, with the action taken at every frame.

    A window is placed by its target frame: first a task, uniformly (GRPO's batch weighs tasks equally, whatever
    their share of the data), then uniform over all that task's frames (not over episodes: short episodes would be
    mostly padding), or, for a `motion` fraction, a frame right after a block moved. Before an episode starts the
    window repeats frame 0 under zero actions (how a rollout starts); past its end the last frame repeats under
    zero actions (what the simulator shows when the pusher holds still)."""

    def __init__(self, latents, actions, episodes, C, K, motion=0.0):
        self.z, self.a, self.C, self.K, self.motion = latents, actions, C, K, motion
        frames = np.concatenate([np.stack([np.full(len(z) - 1, i), np.arange(1, len(z))], 1)
                                 for i, z in enumerate(latents)])  # (episode, target frame) rows
        moving = np.concatenate([np.stack([np.full(len(m), i), m + 1], 1) for i, e in enumerate(episodes)
                                 if len(m := envs.block_motion(e))] or [np.zeros((0, 2), int)])
        task = np.array([e["task"] for e in episodes])
        self.pools = []  # per task: (all its target frames, those right after a block moved)
        for t in dict.fromkeys(task):
            rows, moved = frames[task[frames[:, 0]] == t], moving[task[moving[:, 0]] == t]
            self.pools.append((rows, moved if len(moved) else rows))  # Reach has no block to move

    def sample(self, B: int, chunks: int = 1):
        """B windows of C + chunks * K frames: (b, t, c, h, w) latents, (b, t, a) actions."""
        zs, acts, n = [], [], self.K * chunks
        n_motion = int(round(B * self.motion))
        for j in range(B):
            pool = self.pools[np.random.randint(len(self.pools))][int(j < n_motion)]
            i, f = pool[np.random.randint(len(pool))]
            z, a = self.z[i], self.a[i]  # (T+1, c, h, w), (T+1, a) with a zero last row
            T = len(z)
            s = f - self.C - np.random.randint(n)  # the target lands anywhere in the future part
            pos = np.arange(s, s + self.C + n)
            idx = np.clip(pos, 0, T - 1)
            act = torch.where(torch.from_numpy((pos >= 0) & (pos < T - 1))[:, None].to(a.device), a[idx], 0.0)
            zs.append(z[idx])
            acts.append(act)
        return torch.stack(zs), torch.stack(acts)


def clip_batch(real_eps, imag_eps, codec, L: int, B: int, device, imag_frac: float, vocab: list[str]):
    """Balanced success clips: positives end at a success frame, negatives anywhere else. imag_frac of them are cut
    from imagined replays (same index, the *real* label); of the real ones half are autoencoded, so the classifier
    accepts what the codec draws. real_eps and imag_eps are parallel lists (imag_eps[i] replays real_eps[i]).
    Instructions become word ids in `vocab`, the reward model's own word list."""
    n_imag = int(round(B * imag_frac)) if imag_eps else 0
    frames, words, labels, coded = [], [], [], []
    succ = [i for i, e in enumerate(real_eps) if e["success"][-1]]
    succ_imag = [i for i in succ if i < len(imag_eps)]
    for j in range(B):
        imagined = j < n_imag
        positive = j % 2 == 0 and (succ_imag if imagined else succ)
        pool = (succ_imag if imagined else succ) if positive else range(len(imag_eps) if imagined else len(real_eps))
        i = pool[np.random.randint(len(pool))]
        ep = real_eps[i]
        T = len(ep["frames"])
        end = T - 1 if positive else np.random.randint(0, (T - 1 if ep["success"][-1] else T))
        idx = np.clip(np.arange(end - L + 1, end + 1), 0, T - 1)
        frames.append(torch.from_numpy((imag_eps[i] if imagined else ep["frames"])[idx]))
        words.append(tokenize([ep["instruction"]], vocab)[0])
        labels.append(1 if positive else 0)
        coded.append(not imagined and j % 4 == 1)
    frames = torch.stack(frames).to(device)
    with torch.no_grad():
        m = torch.tensor(coded, device=device)
        frames[m] = codec.to_uint8(codec.decode(codec.encode(frames[m])))
    return frames, torch.stack(words).to(device), torch.tensor(labels, device=device)


def choose_threshold(probs_list, real_success) -> float:
    """Trajectory-level balanced accuracy (verdict: any frame over the threshold), 20 thresholds in [0.3, 0.97]."""
    best, best_t = -1.0, 0.5
    for t in np.linspace(0.3, 0.97, 20):
        v = np.array([bool((p >= t).any()) for p in probs_list])
        tpr = (v & real_success).sum() / max(real_success.sum(), 1)
        tnr = (~v & ~real_success).sum() / max((~real_success).sum(), 1)
        if (tpr + tnr) / 2 > best:
            best, best_t = (tpr + tnr) / 2, float(t)
    return best_t


def fit(model: nn.Module, path: str, num_steps: int, loss_fn, lr: float, run_dir: str, log_name: str, stage: str,
        eval_every: int = 250, lr_mult=lambda step: 1.0, floor: float = 0.1, warmup: int = 100) -> nn.Module:
    """The loop of every train_wm.py stage (codec, world model, its alignment, reward models) and of the lifelong
    refreshes: AdamW, warm-up + cosine to floor * lr, clip 1, atomic checkpoints every eval_every steps, resume
    (weights, optimizer, RNG) under the same stage name, skip when the stage is done. SFT and GRPO keep their own
    flat loops in train_policy.py. loss_fn(net, step) draws this rank's share of a batch and returns net(...)'s
    (loss, logs); under torchrun net is the DistributedDataParallel wrapper. Only rank 0 writes files."""
    rank, world = ddp.dist_init()
    device = next(model.parameters()).device
    state_path = path.replace(".safetensors", ".train.pt")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    state = load_train_state(state_path)
    if state is not None and os.path.exists(path) and state.get("stage") == f"{stage}:done":
        print(f"{stage}: already trained ({path})")
        restore_rng(state)  # a resumed run goes on exactly as the uninterrupted one did after this stage
        return load_same(path, model.cfg, device)
    state = resume(path, model, opt) if state is not None and state.get("stage") == stage else None
    start = state["step"] if state else 0
    if start:
        print(f"resuming {stage} from step {start}")
    net = ddp.wrap_ddp(model)
    bar = tqdm(range(start, num_steps), desc=stage, initial=start, total=num_steps, disable=rank > 0)
    for step in bar:
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, num_steps, lr * lr_mult(step), warmup, floor)
        loss, logs = loss_fn(net, step)
        loss_all = ddp.all_sum(loss.detach()) / world
        if not torch.isfinite(loss_all):
            raise SystemExit(f"error: {stage} loss is {loss_all.item()} at step {step}; "
                             f"kept the last checkpoint {path}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        logs.update(step=step, stage=stage, dt=time.time() - t0)
        if rank == 0:
            envs.log_metrics(run_dir, log_name, logs)
            bar.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in logs.items() if "/" in k})
            if (step + 1) % eval_every == 0 or step + 1 == num_steps:
                save(model, path, step + 1)
                save_train_state(state_path, opt, step + 1, stage=f"{stage}:done" if step + 1 == num_steps else stage)
    ddp.barrier()
    return model


# ----------------------------------------------------------------------------------------------------------
# 5. GRPO in imagination (or in the real env: the same functions, another `world`)


@dataclass
class GRPOConfig:
    """GRPO as in WMPO: group-normalised advantages, asymmetric clip, no KL, no reference model, dynamic sampling
    (drop all-success / all-failure groups), the loss over every executed action token up to the step where success
    is first detected, each trajectory weighted once (`agg`), mini-batches of whole trajectories."""

    group_size: int = 8  # G trajectories per initial state (the paper's 8)
    states_per_task: int = 8  # B initial states per task per iteration
    # rollout temperature (paper 1.6), also the one to deploy at: the SFT policy scores 86.7 / 53.7 on `val` Reach /
    # PushCube at T=0.5 vs 73.0 / 45.0 greedy (per-token argmax is a poor decoder of these wide 256-bin
    # distributions); real-env GRPO at T=1 did not raise them, at T=0.5 it did on seed 0 (README "The oracle").
    temperature: float = 0.5
    clip_low: float = 0.2  # epsilon_low (the paper's)
    clip_high: float = 0.28  # epsilon_high, clip-higher (the paper's)
    # paper 5e-6 for a 7B model. With real rewards 5e-4 unlearns (`val` greedy mean 40.4 -> 31.8, clip fraction 0.21,
    # KL 0.063 per update); 1e-4 is the largest that does not hurt (README "GRPO's step size").
    lr: float = 1e-4
    epochs: int = 2  # passes over each batch (paper 1; the prototype's clip fraction was ~0 with one pass at lr 1e-4)
    minibatches: int = 4  # optimiser steps per epoch (the paper: 512 trajectories in mini-batches of 128)
    max_grad_norm: float = 1.0  # gradient clipping before each optimiser step
    # loss aggregation (kernels.grpo.AGG_MODES). traj-mean: each trajectory's token mean, then the mean over
    # trajectories, as WMPO's actor divides each trajectory's loss by its own token count. token-mean (DAPO's) weighs
    # a trajectory by its length: failures run to the horizon, successes stop early, so every update pushes the
    # sampled tokens down and entropy climbs (0.89 -> 1.17 in 20 iterations, traj-mean 0.87 -> 0.85: experiments.md)
    agg: str = "traj-mean"
    resample_rounds: int = 0  # dynamic sampling: extra rollouts when under half the groups are kept (costs 2x on CPU)


def action_mask(finish: torch.Tensor, n_chunks: int, K: int, A: int, E: int | None = None) -> torch.Tensor:
    """(b, n_chunks, K*A) True for the tokens of actions executed before frame `finish` (the first success frame, or
    the horizon): action i is taken on frame i and makes frame i + 1, so it counts when i < finish. Per action, not
    per chunk: the actions of a chunk after the success frame never ran and get no credit. With E < K actions
    executed per chunk (PolicyConfig.execute), action j of chunk n is global action n*E + j, and j >= E never ran."""
    E = E or K
    j = torch.arange(K)
    step = torch.arange(n_chunks)[:, None] * E + j[None]  # (n, K) global index of each action
    ran = (j < E)[None, None] & (step[None] < finish[:, None, None])
    return repeat(ran, "b n k -> b n (k a)", a=A)


def rollout(policy: VLA, world, horizon: int, B: int, G: int, temperature: float) -> dict:
    """B initial states x G samples rolled out in `world` (WorldModelEnv or envs.RealChunkEnv: the same interface)
    and judged by the world itself (the reward model or the simulator). The first E = policy.cfg.execute actions
    of each chunk run, then the policy looks again (as in the real env). Returns per-trajectory tensors: obs
    (b, n, h, w, c) the frame each chunk was chosen from, tokens (b, n, k*a), words, success, finish, token_mask
    (b, n, k*a) and frames (b, 1 + n*E, h, w, c), the whole trajectory the judge scored."""
    K, E = policy.cfg.chunk, policy.cfg.execute
    n_chunks = -(-horizon // E)  # enough chunks to reach the task's horizon (E actions of each run)
    cur, instr = world.start(B, G)
    words = policy.text.tokenize(instr)
    obs, toks, frames = [], [], [cur[:, None]]
    for _ in range(n_chunks):
        actions, tokens, _ = policy.act(cur.to(words.device), words, temperature)
        new = world.step(actions[:, :E]).to(cur.device)  # (b, E, h, w, c)
        obs.append(cur), toks.append(tokens.cpu()), frames.append(new)
        cur = new[:, -1]
    frames = torch.cat(frames, 1)
    # imagination is never easier than reality: frames past the task's horizon do not count (the real env has
    # stopped there), and a trajectory without success is judged on all its `horizon` actions
    valid = torch.arange(frames.shape[1]) <= horizon
    success, first = detect_success(world.judge(frames).float(), 0.5, valid[None].expand(len(frames), -1))
    finish = torch.where(success, first, torch.full_like(first, horizon))
    return {"obs": torch.stack(obs, 1), "tokens": torch.stack(toks, 1), "words": words.cpu(), "success": success,
            "finish": finish, "token_mask": action_mask(finish, n_chunks, K, policy.cfg.action_dim, E),
            "frames": frames}


def flatten_rows(tr: dict, adv: torch.Tensor, keep: torch.Tensor) -> dict:
    """Per-trajectory rollouts -> one row per chosen chunk (the unit the policy acts in)."""
    n = tr["token_mask"].shape[1]
    return {
        "obs": rearrange(tr["obs"], "b n h w c -> (b n) h w c"),
        "tokens": rearrange(tr["tokens"], "b n ka -> (b n) ka"),
        "words": tr["words"].repeat_interleave(n, 0),
        "adv": adv.repeat_interleave(n, 0),
        "traj": torch.arange(len(adv)).repeat_interleave(n, 0),  # which trajectory each row belongs to
        "token_mask": rearrange(tr["token_mask"], "b n ka -> (b n) ka"),
        "mask": rearrange(tr["token_mask"].any(-1) & keep[:, None], "b n -> (b n)"),  # rows with any counted action
    }


def rollout_logs(tr: dict, stats: dict, bins: int, task: str) -> dict:
    """One task's rollout numbers: success, the group census (a group teaches only when its outcomes differ) and
    how hard the policy pushes (an idling or saturating policy shows there first)."""
    act = (tokens_to_action(tr["tokens"], bins).abs() * tr["token_mask"]).sum() / tr["token_mask"].sum().clamp(min=1)
    return {f"wmpo/success/{task}": tr["success"].float().mean().item(), f"wmpo/mean_abs_action/{task}": act.item(),
            f"wmpo/groups_all_fail/{task}": (stats["mean"] == 0).float().mean().item(),
            f"wmpo/groups_all_success/{task}": (stats["mean"] == 1).float().mean().item()}


def minibatch_loss(policy: VLA, obs, words, tokens, old, adv, tmask, traj, cfg: GRPOConfig, device="cpu"):
    """The GRPO loss (kernels.grpo.grpo_loss, cfg's clip and aggregation) on rows of chosen chunks: obs (m, h, w, c),
    words (m, l), tokens / old log-probs / token_mask (m, k*a), adv (m,), traj (m,) any trajectory ids (renumbered
    here). old None: the current log-probs (ratio 1). Returns (loss, metrics)."""
    from kernels.grpo import grpo_loss

    logp = policy.logprob(obs.to(device), words.to(device), tokens.to(device), cfg.temperature, per_token=True,
                          mask=tmask.to(device))
    if policy.cfg.sampling == "shared":  # a unit is one action dimension of a chunk: counted if any token of it ran
        tmask = rearrange(tmask, "m (k a) -> m k a", a=policy.cfg.action_dim).any(1)
    ids = torch.unique(traj, return_inverse=True)[1].to(device)
    old = logp.detach() if old is None else old.to(device)
    return grpo_loss(logp, old, adv.to(device), tmask.to(device).float(), cfg.clip_low, cfg.clip_high, agg=cfg.agg,
                     traj=ids)


def grpo_update(policy: VLA, opt, batch: dict, cfg: GRPOConfig, device="cpu") -> dict:
    """One GRPO update on a batch of rollouts. batch: obs (r, h, w, c) uint8, words (r, l), tokens (r, k*a),
    adv (r,), mask (r,), token_mask (r, k*a) — one row per chosen chunk, its trajectory's advantage broadcast to it;
    rows with mask False are dropped, tokens with token_mask False do not count."""
    rows = batch["mask"].nonzero()[:, 0]
    obs, words, tokens, adv, tmask = (batch[k][rows] for k in ["obs", "words", "tokens", "adv", "token_mask"])
    traj = batch["traj"][rows] if "traj" in batch else torch.arange(len(rows))  # default: a row per trajectory
    traj = torch.unique(traj, return_inverse=True)[1]  # 0..n_traj-1
    # old log-probs: the rollout policy, at the rollout temperature (exactly what sampled the tokens)
    with torch.no_grad():
        old = torch.cat([policy.logprob(obs[i : i + 256].to(device), words[i : i + 256].to(device),
                                        tokens[i : i + 256].to(device), cfg.temperature, per_token=True,
                                        mask=tmask[i : i + 256].to(device))
                         for i in range(0, len(rows), 256)])
    logs = {k: [] for k in ["grpo/loss", "grpo/clipfrac", "grpo/approx_kl", "grpo/entropy", "grpo/grad_norm"]}
    n_traj = int(traj.max()) + 1 if len(traj) else 0
    for _ in range(cfg.epochs):
        # mini-batches of whole trajectories: traj-mean then sees each trajectory's every token in one loss. Exactly
        # `minibatches` of them on every rank, empty ones too (torch.chunk gives fewer when trajectories are few):
        # under torchrun each step all-reduces every gradient, and ranks keep different numbers of trajectories
        for mb_traj in torch.randperm(n_traj).tensor_split(cfg.minibatches):
            mb = torch.isin(traj, mb_traj).nonzero()[:, 0]
            opt.zero_grad(set_to_none=True)
            if len(mb):
                loss, m = minibatch_loss(policy, obs[mb], words[mb], tokens[mb], old[mb], adv[mb], tmask[mb],
                                         traj[mb], cfg, device)
                loss.backward()
            ddp.mean_grads(policy)  # under torchrun: every rank's groups count, as one big batch would
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            opt.step()
            if not len(mb):
                continue
            for k, v in [("loss", loss), ("clipfrac", m["clipfrac"]), ("approx_kl", m["approx_kl"]),
                         ("grad_norm", grad_norm)]:
                logs[f"grpo/{k}"].append(v.item())
            with torch.no_grad():
                e = policy.entropy(obs[mb[:64]].to(device), words[mb[:64]].to(device), cfg.temperature,
                                   tokens[mb[:64]].to(device))
                logs["grpo/entropy"].append(e.item())
    out = {k: float(sum(v) / max(len(v), 1)) for k, v in logs.items()}
    out["grpo/tokens"] = int(tmask.sum())
    return out


# ----------------------------------------------------------------------------------------------------------
# checkpoints: weights in safetensors, {"kind", "config", "step"} in its metadata; written atomically


def save(model: nn.Module, path: str, step: int = 0, **extra) -> None:
    model = getattr(model, "_orig_mod", model)  # never save a compiled wrapper's prefixed names
    model = getattr(model, "module", model)  # nor a DDP wrapper's
    meta = {"kind": type(model).__name__, "config": json.dumps(asdict(model.cfg)), "step": str(step)}
    if hasattr(model, "text"):  # the word list the embedding rows belong to
        meta["vocab"] = json.dumps(model.text.words)
    meta.update({k: json.dumps(v) for k, v in extra.items()})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    envs.atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_meta(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})") from e


def load(path: str, device="cpu", expect: str | None = None) -> nn.Module:
    """Rebuild a model from a checkpoint alone (its config is in the metadata); clear errors name the problem."""
    meta = read_meta(path)
    kind = meta.get("kind")
    if kind not in MODELS:
        raise ValueError(f"checkpoint {path} has no known model kind in its metadata (got {kind!r})")
    if expect is not None and kind != expect:
        raise ValueError(f"checkpoint {path} holds a {kind}, expected a {expect}")
    module_cls, cfg_cls = MODELS[kind]
    if kind in ("VLA", "RewardModel") and "vocab" not in meta:
        raise ValueError(f"checkpoint {path} has no vocabulary in its metadata: it predates word lists saved with "
                         "checkpoints (issue 15) and would decode instructions with today's word ids; retrain it")
    try:
        cfg = cfg_cls(**json.loads(meta["config"]))
    except TypeError as e:
        raise ValueError(f"checkpoint {path}: config does not match {cfg_cls.__name__} ({e})") from e
    model = module_cls(cfg, json.loads(meta["vocab"])) if "vocab" in meta else module_cls(cfg)
    try:
        state = load_file(path)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})") from e
    check_state(model, state, path)
    model.load_state_dict(state)
    model.step = int(meta.get("step", 0))
    model.meta = {k: v for k, v in meta.items() if k not in ("kind", "config", "step", "vocab")}
    return model.to(device)


def load_same(path: str, cfg, device="cpu", expect: str | None = None) -> nn.Module:
    """Load a checkpoint to resume from, refusing one written with another model config (names the fields)."""
    model = load(path, device, expect)
    theirs, ours = asdict(model.cfg), asdict(cfg)
    derived = ("threshold", "residual_scale", "table_rgb")  # set by training, not by flags
    diff = [f"{k} {theirs.get(k)!r} vs {ours[k]!r}" for k in ours if k not in derived
            and json.dumps(theirs.get(k)) != json.dumps(ours[k])]
    if diff:
        raise ValueError(f"checkpoint {path} was written with another model config ({', '.join(diff)}); "
                         f"use the flags it was made with, or another --run-dir")
    return model


def check_state(model: nn.Module, state: dict, path: str) -> None:
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in own.items():
        if v.shape != state[k].shape:
            raise ValueError(f"checkpoint {path}: {k} has shape {tuple(state[k].shape)}, "
                             f"model expects {tuple(v.shape)}")


def save_train_state(path: str, optimizer, step: int, **extra) -> None:
    """Optimizer, step and RNG state (torch and numpy) for resuming, beside the weights (read with weights_only=True:
    numpy's state is stored as a tensor and plain numbers)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
             "numpy_rng": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)], **extra}
    envs.atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_train_state(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:
        raise ValueError(f"training state {path} is corrupt ({type(e).__name__}: {e}); delete it to start over") from e


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    if "numpy_rng" in state:
        keys, pos, has_gauss, gauss = state["numpy_rng"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def resume(path: str, model: nn.Module, optimizer, expect: str | None = None) -> dict | None:
    """The one resume step of every training loop: if `path` and its training state (`X.train.pt`) exist, load the
    weights (refusing another model config), the optimizer and the RNG state, and return the state (its "step" is
    where to go on); else None (start from scratch). Weights without their training state (copied without it, or
    an older version's run) are never trained over from scratch: they go on from their own step."""
    state_path = path.replace(".safetensors", ".train.pt")
    state = load_train_state(state_path)
    if not os.path.exists(path):
        return None
    getattr(model, "module", model).load_state_dict(load_same(path, model.cfg, expect=expect).state_dict())
    if state is None:
        meta = read_meta(path)
        print(f"note: {path} has no training state ({state_path}): going on from its step {meta.get('step', 0)} "
              "with a fresh optimizer")
        extra = {k: json.loads(meta[k]) for k in ["real_trajectories"] if k in meta}  # GRPO's budget so far
        return {"step": int(meta.get("step", 0)), **extra}
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(state)
    return state


def lr_at(step: int, num_steps: int, peak: float, warmup: int = 100, floor: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `peak` down to floor * peak at `num_steps`. A python
    float: a numpy one would not load back from the optimizer state with weights_only."""
    cosine = floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * step / num_steps))
    return float(peak * min(1.0, (step + 1) / warmup) * cosine)


MODELS = {"VLA": (VLA, PolicyConfig), "FrameCodec": (FrameCodec, CodecConfig),
          "WorldModel": (WorldModel, WorldModelConfig), "RewardModel": (RewardModel, RewardConfig)}


def shift_augment(frames: torch.Tensor, pad: int = 3, shifts: torch.Tensor | None = None) -> torch.Tensor:
    """Shift each sample up to `pad` px, edge-replicated; uint8 (b, h, w, c); shifts (2, b) in [0, 2 pad] or random."""
    b, h, w, c = frames.shape
    x = F.pad(rearrange(frames, "b h w c -> b c h w").float(), (pad,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, b)) if shifts is None else shifts).tolist()
    out = torch.stack([x[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    return rearrange(out, "b c h w -> b h w c").to(torch.uint8)
