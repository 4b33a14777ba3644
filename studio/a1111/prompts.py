"""Prompts as AUTOMATIC1111 users write them.

    a (red:1.3) circle, [blue] background <lora:hexagon:0.8> BREAK high quality

- attention: `(words)` ×1.1, `((words))` ×1.21, `(words:1.3)` ×1.3, `[words]` ÷1.1; `\\(`, `\\)`, `\\[`, `\\]`
  and `\\\\` are the characters themselves; an unclosed bracket reaches to the end of the prompt;
- `BREAK` (upper case, a word of its own) starts a new chunk of the text encoder's window;
- extra networks: `<lora:name>`, `<lora:name:0.8>`, `<lora:name:te:unet>` (`te=`/`unet=` by name too) are
  taken out of the text, as A1111 does, and applied as LoRA add-ons.

What A1111 users would call a mistake is refused with a message that quotes it (`prompt_mistakes`, and
`parse_prompt` for LoRA tags): a LoRA tag without a name (`<lora:>`) or with a weight that is not a number, and an
emphasis weight that is not a plain number (`(red:1e308)`, `(red:inf)`, `(red:1.2.3)`) or whose size is beyond
MAX_EMPHASIS (A1111 takes any, but far beyond it the image is noise, and a huge one overflows the encoder).

The parsing is A1111's (tests/test_prompts.py checks its documented examples). compel tokenizes the parsed
fragments and cuts prompts longer than the window into chunks, which are encoded one by one and concatenated
(SD 1.x/2.x, and SDXL's two encoders, whose pooled embedding is the first chunk's); each chunk is weighted as
A1111 weights it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from studio.core.errors import InvalidRequest

ROUND_BRACKET = 1.1
SQUARE_BRACKET = 1 / 1.1
BREAK = "BREAK"

# One token of A1111's attention grammar: an escape, a bracket, a weight that closes a round bracket, a run of
# plain text, or a colon that is plain text.
_ATTENTION_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]            # an escaped bracket or backslash
  | \\                      # a lone backslash (dropped, as in A1111)
  | [(\[]                   # an opening bracket
  | :\s*([+-]?[.\d]+)\s*\)  # ":1.3)", ": 1.3 )": closes a round bracket with that weight
  | [)\]]                   # a closing bracket
  | [^\\()\[\]:]+           # plain text
  | :                       # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
# A1111's extra networks: <type:arguments>
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]*)>")  # `<lora:>` too, to be refused rather than read as words
LORA_TYPES = ("lora", "lyco")  # LyCORIS tags name LoRA files too


@dataclass(frozen=True)
class LoraUse:
    """One `<lora:...>` of a prompt: which LoRA, at which weight for the text encoder(s) and for the UNet."""

    name: str
    text_encoder_weight: float = 1.0
    unet_weight: float = 1.0

    @property
    def tag(self) -> str:
        if self.text_encoder_weight == self.unet_weight:
            return f"<lora:{self.name}:{self.unet_weight:g}>"
        return f"<lora:{self.name}:{self.text_encoder_weight:g}:{self.unet_weight:g}>"


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt as typed, split into what the text encoder reads and the LoRAs it names."""

    typed: str  # as typed: this is what the PNG keeps
    text: str  # without the extra-network tags: what the attention parser reads
    loras: tuple[LoraUse, ...] = ()
    ignored_tags: tuple[str, ...] = ()  # extra networks of other types (hypernetworks ...), which we do not run

    @property
    def fragments(self) -> list[tuple[str, float]]:
        return parse_attention(self.text)

    @property
    def plain(self) -> str:
        """The words alone, without weights, brackets, BREAKs or tags (for CLIP scores and vocabulary checks)."""
        return plain_text(self.text)


def parse_prompt(typed: str) -> ParsedPrompt:
    """Take the extra-network tags out of a prompt (raises InvalidRequest for a malformed LoRA tag)."""
    loras: list[LoraUse] = []
    ignored: list[str] = []
    problems: list[str] = []

    def take(match: re.Match) -> str:
        kind, arguments = match.group(1), match.group(2)
        if kind.lower() in LORA_TYPES:
            try:
                loras.append(parse_lora_arguments(arguments))
            except ValueError as error:
                problems.append(f"{match.group(0)}: {error}")
        else:
            ignored.append(match.group(0))
        return ""

    text = _EXTRA_NETWORK.sub(take, typed or "")
    if problems:
        raise InvalidRequest(problems)
    return ParsedPrompt(typed=typed or "", text=text, loras=tuple(merge_loras(loras)), ignored_tags=tuple(ignored))


def without_extra_networks(text: str) -> str:
    """The text with every `<type:...>` tag taken out, unchecked (for a prompt already checked, and for the
    negative prompt, whose tags A1111 does not run either)."""
    return _EXTRA_NETWORK.sub("", text or "")


def parse_lora_arguments(arguments: str) -> LoraUse:
    """`name`, `name:0.8`, `name:te:unet` or `name:unet=0.5:te=1` (A1111's forms)."""
    name, *values = [part.strip() for part in arguments.split(":")]
    if not name:
        raise ValueError("name the LoRA, as in <lora:name:0.8>.")
    positional: list[float] = []
    named: dict[str, float] = {}
    for value in values:
        key, _, number = value.rpartition("=")
        weight = _weight(number, value)
        if key:
            if key not in ("te", "unet"):
                raise ValueError(f"{key!r} is not a LoRA setting (use te= and unet=).")
            named[key] = weight
        else:
            positional.append(weight)
    if len(positional) > 2:
        raise ValueError("give at most two weights: the text encoder's and the UNet's.")
    text_encoder = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else text_encoder)
    return LoraUse(name, text_encoder, unet)


def _weight(number: str, written: str) -> float:
    if not number:
        raise ValueError("a weight is missing after ':' (write a number such as 0.8, or leave out the ':').")
    try:
        weight = float(number)
    except ValueError:
        raise ValueError(f"{written!r} is not a weight (write a number such as 0.8).") from None
    if not math.isfinite(weight):
        raise ValueError(f"{written!r} is not a weight (write a number such as 0.8).")
    return weight


def merge_loras(loras: list[LoraUse]) -> list[LoraUse]:
    """The same LoRA named twice is applied once, at the weights written last (A1111 keeps the last too)."""
    return list({lora.name: lora for lora in loras}.values())


def with_lora(prompt: str, lora: LoraUse) -> str:
    """The prompt with `lora`'s tag: written in place of the tag it already has for that LoRA, else appended
    (what the LoRA picker does, as clicking a card in A1111's extra networks does)."""
    for match in _EXTRA_NETWORK.finditer(prompt):
        if match.group(1).lower() in LORA_TYPES:
            try:
                existing = parse_lora_arguments(match.group(2))
            except ValueError:
                continue
            if existing.name == lora.name:
                return prompt[: match.start()] + lora.tag + prompt[match.end():]
    return f"{prompt.rstrip()} {lora.tag}".strip()


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A1111's attention syntax: (text, weight) fragments in order, with ("BREAK", -1) where a BREAK is. Runs
    of the same weight are merged; an empty prompt is one empty fragment."""
    fragments: list[list] = []  # [text, weight], scaled in place as brackets close
    open_round: list[int] = []  # where each open bracket's span starts in `fragments`
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if weight is not None and not _is_number(weight):  # ":..)" (A1111 crashes): the text, then a bracket
            fragments.append([token[:-1], 1.0])
            token, weight = ")", None
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(fragments))
        elif token == "[":
            open_square.append(len(fragments))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET)
        else:  # plain text (a bracket with nothing to close is text too), split at BREAKs
            for index, part in enumerate(_BREAK_WORD.split(token)):
                if index:
                    fragments.append([BREAK, -1])
                fragments.append([part, 1.0])
    # brackets left open reach to the end
    for start in open_round:
        scale_from(start, ROUND_BRACKET)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET)
    if not fragments:
        fragments = [["", 1.0]]
    merged: list[list] = [fragments[0]]
    for fragment in fragments[1:]:
        if fragment[1] == merged[-1][1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return [(fragment_text, weight) for fragment_text, weight in merged]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:  # "..": A1111 crashes on it; here it is plain text
        return False
    return True


MAX_EMPHASIS = 10.0  # the largest size of a word's weight, brackets multiplied (A1111's usual range: 0.5 to 1.5)
# After ":", a number A1111's weight pattern ([+-]?[.\d]+) does not read: exponent notation, inf, nan
_MISTYPED_WEIGHT = re.compile(r":\s*([+-]?(?:[.\d]+e[+-]?\d+|inf(?:inity)?|nan))\s*\)", re.IGNORECASE)


def prompt_mistakes(text: str) -> list[str]:
    """What A1111 users would call a mistake in a prompt's emphasis, each quoting the bracket it is in: a weight
    that is not a plain number, or one (or brackets multiplied) beyond ±MAX_EMPHASIS. Empty for a sound prompt,
    which is parsed as before (the LoRA tags are `parse_prompt`'s to check)."""
    text = without_extra_networks(text)
    allowed = f"write a number from -{MAX_EMPHASIS:g} to {MAX_EMPHASIS:g}, as in (red:1.3)"
    mistakes: list[str] = []
    open_round: list[int] = []  # where each open round bracket is in `text`
    for match in _ATTENTION_TOKEN.finditer(text):
        token, written = match.group(0), match.group(1)
        if token == "(":
            open_round.append(match.start())
        elif token == ")" and open_round:
            open_round.pop()
        elif written is not None and open_round:  # "(red:1.3)": A1111 reads 1.3 as the weight
            bracket = _quoted(text[open_round.pop():match.end()])
            if not _is_number(written):
                mistakes.append(f"{bracket}: {written!r} is not a weight; {allowed}.")
            elif abs(float(written)) > MAX_EMPHASIS:
                mistakes.append(f"{bracket}: the weight {written} is out of range; {allowed}.")
        elif token == ":" and open_round and (mistyped := _MISTYPED_WEIGHT.match(text, match.start())):
            bracket = _quoted(text[open_round[-1]:mistyped.end()])
            mistakes.append(f"{bracket}: {mistyped.group(1)!r} is not a weight; {allowed}.")
    if mistakes:
        return mistakes
    for fragment, weight in parse_attention(text):  # brackets multiply: ((((red:5)))) is 7.3
        if not (fragment == BREAK and weight == -1) and not abs(weight) <= MAX_EMPHASIS:
            mistakes.append(f"{_quoted(fragment.strip())!r} is weighted {weight:.3g} by its nested brackets, which "
                            f"multiply; keep it from -{MAX_EMPHASIS:g} to {MAX_EMPHASIS:g}.")
    return mistakes


def _quoted(fragment: str, most: int = 80) -> str:
    """A fragment of the prompt for a message, its middle cut when it is long."""
    return fragment if len(fragment) <= most else f"{fragment[:most // 2]}…{fragment[-most // 2:]}"


def split_at_breaks(fragments: list[tuple[str, float]]) -> list[list[tuple[str, float]]]:
    """The fragments of each chunk group that BREAK separates."""
    groups: list[list[tuple[str, float]]] = [[]]
    for text, weight in fragments:
        if weight == -1 and text == BREAK:  # A1111's test: "(cat:-1)" is a weight, not a BREAK
            groups.append([])
        else:
            groups[-1].append((text, weight))
    return groups


def plain_text(text: str) -> str:
    """The words of a prompt without A1111's syntax: weights, brackets, BREAKs and extra-network tags."""
    fragments = parse_attention(_EXTRA_NETWORK.sub("", text))
    words = " ".join(fragment for fragment, weight in fragments if weight != -1)
    return re.sub(r"\s+", " ", words).strip()


# ----- encoding (compel) -----


class ClipSkipped:
    """A text encoder as compel sees it under A1111's clip skip: its `last_hidden_state` is the hidden state
    `clip_skip` layers from the end, through the final layer norm. (compel's own clip-skip option reaches for
    `text_encoder.text_model`, which transformers 5's CLIPTextModel no longer has.)"""

    def __init__(self, encoder, clip_skip: int):
        self.encoder = encoder
        self.clip_skip = clip_skip

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False, return_dict=True):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if not getattr(self.encoder.config, "use_attention_mask", False):
            attention_mask = None  # CLIP was trained without one (as diffusers encodes)
        output = self.encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        final_norm = getattr(self.encoder, "final_layer_norm", None) or self.encoder.text_model.final_layer_norm
        return BaseModelOutputWithPooling(last_hidden_state=final_norm(output.hidden_states[-self.clip_skip]),
                                          pooler_output=output.pooler_output, hidden_states=output.hidden_states)


def compel_for(tokenizer, text_encoder, device, embeddings_type, requires_pooled: bool = False):
    from compel import Compel

    return Compel(tokenizer=tokenizer, text_encoder=text_encoder, truncate_long_prompts=False, device=device,
                  returned_embeddings_type=embeddings_type, requires_pooled=requires_pooled)


COMMA_BACKTRACK = 20  # A1111's "comma_padding_backtrack": a window ends after a comma this close to its end


def a1111_windows(token_ids: list[int], weights: list[float], length: int,
                  comma_id: int | None) -> list[tuple[list[int], list[float]]]:
    """A prompt's tokens cut into windows of `length` as A1111 cuts them: when a window is full and a comma is
    among its last COMMA_BACKTRACK tokens, the window ends after the comma and the rest starts the next one."""
    windows: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    token_weights: list[float] = []
    last_comma = -1
    for token, weight in zip(token_ids, weights):
        if token == comma_id:
            last_comma = len(tokens)
        elif len(tokens) == length and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
            cut = last_comma + 1
            windows.append((tokens[:cut], token_weights[:cut]))
            tokens, token_weights = tokens[cut:], token_weights[cut:]
            last_comma = -1
        if len(tokens) == length:
            windows.append((tokens, token_weights))
            tokens, token_weights, last_comma = [], [], -1
        tokens.append(token)
        token_weights.append(weight)
    if tokens or not windows:  # A1111 drops an empty last window, but a prompt always has one
        windows.append((tokens, token_weights))
    return windows


def encode_windows(compel, groups: list[list[tuple[str, float]]]) -> torch.Tensor:
    """Each BREAK group tokenized (compel, fragment by fragment) and cut into windows as A1111 cuts them, each
    window framed by start and end tokens, padded, encoded and weighted as A1111 does; the windows concatenated:
    (1, n × window, dim)."""
    provider = compel.conditioning_provider
    tensors = []
    for index, group in enumerate(groups):
        token_ids, weights = _group_tokens(provider, group)
        if not token_ids and tensors and index == len(groups) - 1:
            continue  # a BREAK at the very end adds no empty window (A1111 drops it)
        for ids, window_weights in _windows(provider, token_ids, weights):
            framed = _framed(provider, ids)
            multipliers = torch.tensor([1.0, *window_weights] + [1.0] * (len(framed) - 1 - len(window_weights)))
            ids_tensor = torch.tensor([framed], dtype=torch.long, device=compel.device)
            z = provider._encode_token_ids_to_embeddings(ids_tensor, torch.ones_like(ids_tensor))
            tensors.append(a1111_emphasis(z, multipliers))
    return torch.cat(tensors, dim=1)


def _group_tokens(provider, group: list[tuple[str, float]]) -> tuple[list[int], list[float]]:
    """A BREAK group's token ids (no start or end tokens), and each token's weight (its fragment's)."""
    group = group or [("", 1.0)]
    token_ids: list[int] = []
    weights: list[float] = []
    for ids, (_text, weight) in zip(provider.get_token_ids([text for text, _ in group],
                                                           include_start_and_end_markers=False), group):
        token_ids += ids
        weights += [weight] * len(ids)
    return token_ids, weights


def _windows(provider, token_ids: list[int], weights: list[float]) -> list[tuple[list[int], list[float]]]:
    """A1111's windows for the provider's encoder: its token count less the start and end tokens."""
    comma_id = provider.tokenizer.convert_tokens_to_ids(",</w>")
    return a1111_windows(token_ids, weights, provider.max_token_count - 2, comma_id)


def _framed(provider, ids: list[int]) -> list[int]:
    """A window's ids between the start and end tokens, padded to the encoder's token count."""
    tokenizer = provider.tokenizer
    framed = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    return framed + [tokenizer.pad_token_id] * (provider.max_token_count - len(framed))


def first_window_text(compel, groups: list[list[tuple[str, float]]]) -> list[int]:
    """The token ids of the first window, as `encode_windows` cuts it (SDXL's pooled embedding is its)."""
    provider = compel.conditioning_provider
    token_ids, weights = _group_tokens(provider, groups[0])
    return _windows(provider, token_ids, weights)[0][0]


def a1111_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's weighting ("Original" emphasis): each token's embedding times its weight, then the whole window
    scaled back to its mean before weighting. compel's own weighting (pushing a token away from the empty
    prompt's embedding, and re-encoding without it to weaken it) moved the embedded model's colours the asked
    way less often (bench/prompt_weights.py), and is not what A1111 users wrote their prompts for."""
    if bool(torch.all(weights == 1)):
        return z  # bit for bit what the text encoder gave (a plain prompt encodes exactly as diffusers does)
    original_mean = z.mean()
    weighted = z * weights.to(z.device, z.dtype).reshape(1, -1, 1)
    return weighted * (original_mean / weighted.mean())


def pad_to_length(compel, tensor: torch.Tensor, length: int) -> torch.Tensor:
    """`tensor` with empty chunks (the encoding of "") appended up to `length` tokens, as A1111 pads the shorter
    of the prompt and the negative prompt so that they batch together for CFG."""
    empty = compel.conditioning_provider.empty_z.to(tensor.device, tensor.dtype)
    missing = (length - tensor.shape[1]) // empty.shape[1]
    return torch.cat([tensor] + [empty.expand(tensor.shape[0], -1, -1)] * missing, dim=1)


def first_window_pooled(compel, groups: list[list[tuple[str, float]]], device: torch.device) -> torch.Tensor:
    """The second SDXL encoder's pooled embedding of the first window, as A1111 and diffusers condition on."""
    from compel.embeddings_provider import _get_pooled_output_from_text_encoder_output

    provider = compel.conditioning_provider
    framed = _framed(provider, first_window_text(compel, groups))
    output = provider.text_encoder(torch.tensor([framed], device=device), return_dict=True)
    return _get_pooled_output_from_text_encoder_output(output)
