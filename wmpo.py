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
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch._dynamo  # noqa: F401  (before any MuJoCo renderer: see envs.py)
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

# ----------------------------------------------------------------------------------------------------------
# instructions -> word ids, with no download: the vocabulary is every word the task grammar can produce


def build_vocab() -> list[str]:
    import envs

    words = set()
    for tmpl in envs.REACH_TEMPLATES + envs.PUSH_TEMPLATES + envs.PUSH_TWO_TEMPLATES:
        words.update(tmpl.replace(",", " ").split())
    words.update(c for c in envs.COLORS)
    words = {w for w in words if not w.startswith("{")}
    return ["<pad>", "<unk>"] + sorted(words)


VOCAB = build_vocab()
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
PAD, UNK = 0, 1


def tokenize(instructions: list[str], max_len: int = 24) -> torch.Tensor:
    """Word ids (b, l), padded with PAD; words outside the vocabulary map to UNK (never an error)."""
    ids = torch.full((len(instructions), max_len), PAD, dtype=torch.long)
    for i, text in enumerate(instructions):
        words = text.lower().replace(",", " ").split()[:max_len]
        ids[i, : len(words)] = torch.tensor([WORD_ID.get(w, UNK) for w in words], dtype=torch.long)
    return ids


def detokenize(ids: torch.Tensor) -> list[str]:
    return [" ".join(VOCAB[i] for i in row.tolist() if i != PAD) for row in ids]


# ----------------------------------------------------------------------------------------------------------
# actions <-> tokens: 256 uniform bins over [-1, 1] per dimension (actions are already normalised to [-1, 1])


def action_to_tokens(actions: torch.Tensor, bins: int = 256) -> torch.Tensor:
    return torch.round((actions.clamp(-1, 1) + 1) / 2 * (bins - 1)).long()


def tokens_to_action(tokens: torch.Tensor, bins: int = 256) -> torch.Tensor:
    return tokens.float() / (bins - 1) * 2 - 1  # bin centres; round trip error <= half a bin = 1 / (bins - 1)


def frames_to_model(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., h, w, c) -> float (..., c, h, w) in [-1, 1]."""
    return rearrange(frames, "... h w c -> ... c h w").float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------
# 1. VLA policy


@dataclass
class PolicyConfig:
    chunk: int = 8  # K actions per call (the paper's 8)
    action_dim: int = 2  # a
    bins: int = 256  # discrete bins per action dimension (the paper's 256)
    width: int = 32  # conv channels (64 is 4x slower on CPU for little gain at 64x64)
    keypoints: int = 32  # spatial-softmax keypoints
    text_dim: int = 64  # word embedding and GRU width
    hidden: int = 512  # MLP head width
    vocab: int = len(VOCAB)


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


class VLA(nn.Module):
    """Frame + instruction -> K x A action tokens, all decoded in one forward pass (parallel decoding).

    Vision: convs FiLM-conditioned on the instruction, then spatial-softmax keypoints (a plain conv+flatten
    encoder could not clone the expert from pixels in the prototype; keypoints give ~2 px precise positions).
    Language: word embeddings + a bidirectional GRU (word order matters: "red ... then blue").
    """

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        w, td = cfg.width, cfg.text_dim
        self.embed = nn.Embedding(cfg.vocab, td, padding_idx=PAD)
        self.gru = nn.GRU(td, td, batch_first=True, bidirectional=True)
        self.text_out = nn.Linear(2 * td, td)
        self.conv1 = nn.Conv2d(3 + 2, w, 5, stride=2, padding=2)  # +2: pixel coordinates (CoordConv)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1)
        self.film2 = FiLM(td, w)
        self.conv3 = nn.Conv2d(w, w, 3, padding=1)
        self.film3 = FiLM(td, w)
        self.conv4 = nn.Conv2d(w, cfg.keypoints, 3, padding=1)
        self.head = nn.Sequential(
            nn.Linear(2 * cfg.keypoints + td, cfg.hidden),
            nn.GELU(),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.GELU(),
            nn.Linear(cfg.hidden, cfg.chunk * cfg.action_dim * cfg.bins),
        )

    def encode_text(self, words):  # (b, l) -> (b, d)
        x = self.embed(words)
        lengths = (words != PAD).sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)  # h: (2, b, d), last state of each direction
        return self.text_out(rearrange(h, "two b d -> b (two d)"))

    def logits(self, frames: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """frames uint8 (b, h, w, c), words (b, l) -> logits (b, k*a, v)."""
        x = frames_to_model(frames)
        b, c, h, w = x.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device), indexing="ij")
        x = torch.cat([x, repeat(torch.stack([xs, ys]), "two h w -> b two h w", b=b)], dim=1)
        text = self.encode_text(words)
        x = F.gelu(self.conv1(x))  # (b, d, 32, 32)
        x = F.gelu(self.film2(self.conv2(x), text))
        x = F.gelu(self.film3(self.conv3(x), text))
        x = self.conv4(x)  # (b, keypoints, 32, 32)
        # -- spatial softmax: each channel becomes the expected (x, y) of its activation map --
        attn = rearrange(x, "b n h w -> b n (h w)").softmax(-1)
        hh, ww = x.shape[-2:]
        gy, gx = torch.meshgrid(torch.linspace(-1, 1, hh, device=x.device), torch.linspace(-1, 1, ww, device=x.device), indexing="ij")
        kx = attn @ gx.reshape(-1, 1)  # (b, n, 1)
        ky = attn @ gy.reshape(-1, 1)
        feats = torch.cat([rearrange(torch.cat([kx, ky], -1), "b n two -> b (n two)"), text], dim=-1)
        out = self.head(feats)
        return rearrange(out, "b (ka v) -> b ka v", v=self.cfg.bins)

    @torch.no_grad()
    def act(self, frames: torch.Tensor, words: torch.Tensor, temperature: float = 0.0):
        """Sample (temperature > 0) or take the argmax (0) of every token.

        Returns (actions (b, k, a) in [-1, 1], tokens (b, k*a), logp (b,)): logp is the exact log-probability of
        the chosen tokens under the distribution they were drawn from (softmax(logits / temperature); T=1 for
        greedy), the sum over the chunk's K*A tokens (paper eq. 3).
        """
        logits = self.logits(frames, words)
        if temperature > 0:
            logp_all = (logits / temperature).log_softmax(-1)
            tokens = torch.multinomial(rearrange(logp_all.exp(), "b n v -> (b n) v"), 1)
            tokens = rearrange(tokens, "(b n) 1 -> b n", b=logits.shape[0])
        else:
            logp_all = logits.log_softmax(-1)
            tokens = logits.argmax(-1)
        logp = logp_all.gather(-1, tokens[..., None])[..., 0].sum(-1)
        actions = rearrange(tokens_to_action(tokens, self.cfg.bins), "b (k a) -> b k a", a=self.cfg.action_dim)
        return actions, tokens, logp

    def logprob(self, frames, words, tokens, temperature: float = 1.0, per_token: bool = False):
        """Log-probability of given tokens (b, k*a), with gradients: (b,) summed, or (b, k*a) with per_token."""
        logp_all = (self.logits(frames, words) / max(temperature, 1e-6)).log_softmax(-1)
        lp = logp_all.gather(-1, tokens[..., None])[..., 0]
        return lp if per_token else lp.sum(-1)

    def entropy(self, frames, words, temperature: float = 1.0):
        """Mean per-token entropy (nats), for logging."""
        logp_all = (self.logits(frames, words) / max(temperature, 1e-6)).log_softmax(-1)
        return -(logp_all.exp() * logp_all).sum(-1).mean()

    def forward(self, frames, words, tokens, token_mask):
        """SFT: cross-entropy on the action tokens. Returns (loss, logs)."""
        logits = self.logits(frames, words)
        ce = F.cross_entropy(rearrange(logits, "b n v -> (b n) v"), tokens.reshape(-1), reduction="none")
        m = token_mask.reshape(-1).float()
        loss = (ce * m).sum() / m.sum().clamp(min=1)
        acc = ((logits.argmax(-1).reshape(-1) == tokens.reshape(-1)).float() * m).sum() / m.sum().clamp(min=1)
        # within one bin either side: a finer accuracy than exact-token match for 256 bins
        near = (((logits.argmax(-1) - tokens).abs().reshape(-1) <= 2).float() * m).sum() / m.sum().clamp(min=1)
        return loss, {"sft/loss": loss.item(), "sft/token_acc": acc.item(), "sft/token_acc_2bins": near.item()}


def policy_fn(policy: VLA, temperature: float, device="cpu"):
    """An envs.collect policy callable: runs the VLA on a batch of observations, returns action chunks."""

    def fn(obs, instructions, venv):
        frames = torch.as_tensor(obs, device=device)
        actions, _, _ = policy.act(frames, tokenize(instructions).to(device), temperature)
        return actions.cpu().numpy()

    return fn


# ----------------------------------------------------------------------------------------------------------
# checkpoints: weights in safetensors, {"kind", "config", "step"} in its metadata; written atomically


def atomic_write(path: str, write_fn) -> None:
    """write_fn(tmp_path), fsync, rename: a kill at any moment leaves either the old file or the new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write_fn(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(model: nn.Module, path: str, step: int = 0, **extra) -> None:
    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)  # never save a compiled wrapper's prefixed names
    model = getattr(model, "module", model)  # nor a DDP wrapper's
    meta = {"kind": type(model).__name__, "config": json.dumps(asdict(model.cfg)), "step": str(step)}
    meta.update({k: json.dumps(v) for k, v in extra.items()})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_meta(path: str) -> dict:
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})") from e


def load(path: str, device="cpu", expect: str | None = None) -> nn.Module:
    """Rebuild a model from a checkpoint alone (its config is in the metadata); clear errors name the problem."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    kind = meta.get("kind")
    if kind not in MODELS:
        raise ValueError(f"checkpoint {path} has no known model kind in its metadata (got {kind!r})")
    if expect is not None and kind != expect:
        raise ValueError(f"checkpoint {path} holds a {kind}, expected a {expect}")
    module_cls, cfg_cls = MODELS[kind]
    cfg_dict = json.loads(meta["config"])
    try:
        cfg = cfg_cls(**cfg_dict)
    except TypeError as e:
        raise ValueError(f"checkpoint {path}: config does not match {cfg_cls.__name__} ({e})") from e
    model = module_cls(cfg)
    try:
        state = load_file(path)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})") from e
    check_state(model, state, path)
    model.load_state_dict(state)
    model.step = int(meta.get("step", 0))
    model.meta = {k: v for k, v in meta.items() if k not in ("kind", "config", "step")}
    return model.to(device)


def check_state(model: nn.Module, state: dict, path: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in own.items():
        if v.shape != state[k].shape:
            raise ValueError(f"checkpoint {path}: {k} has shape {tuple(state[k].shape)}, model expects {tuple(v.shape)}")


def save_train_state(path: str, optimizer, step: int, **extra) -> None:
    """Optimizer, step and RNG state for resuming, beside the weights (read with weights_only=True)."""
    state = {"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state(), **extra}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_train_state(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:
        raise ValueError(f"training state {path} is corrupt ({type(e).__name__}: {e}); delete it to start over") from e


MODELS = {"VLA": (VLA, PolicyConfig)}


# ----------------------------------------------------------------------------------------------------------
# run-folder helpers: every step writes <step>.args.json and appends to <step>.metrics.jsonl


def write_args(run_dir: str, step_name: str, args) -> None:
    os.makedirs(run_dir, exist_ok=True)
    data = json.dumps(asdict(args), indent=2, default=str)
    atomic_write(os.path.join(run_dir, f"{step_name}.args.json"), lambda tmp: open(tmp, "w").write(data))


def log_metrics(run_dir: str, step_name: str, metrics: dict) -> None:
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise FloatingPointError(f"{step_name}: metric {k} is {v} at step {metrics.get('step')}; stopping, "
                                     f"the last good checkpoint in {run_dir} is kept")
    with open(os.path.join(run_dir, f"{step_name}.metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")


def require(path: str, command: str) -> str:
    """Stop with a message naming the command that makes a missing run-folder input."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found; make it first with: {command}")
    return path


def shift_augment(frames: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """Random translation by up to `pad` pixels (edge-replicated), one shift per sample. uint8 (b, h, w, c)."""
    b, h, w, c = frames.shape
    x = F.pad(rearrange(frames, "b h w c -> b c h w").float(), (pad,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b)).tolist()
    out = torch.stack([x[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    return rearrange(out, "b c h w -> b h w c").to(torch.uint8)
