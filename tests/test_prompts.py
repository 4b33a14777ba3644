"""Prompts as A1111 users write them: its attention parser (checked against A1111's own documented examples),
LoRA tags, and the chunked encoding of long prompts for SD and SDXL."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from tiny_models import EMBEDDED, save_tiny_sdxl

from studio.a1111.prompts import (
    LoraUse,
    parse_attention,
    parse_prompt,
    plain_text,
    prompt_mistakes,
    split_at_breaks,
    with_lora,
)
from studio.core.errors import InvalidRequest
from studio.models.families import family_named
from studio.tasks.generation import TextToImageRequest

CPU = torch.device("cpu")


def encode_sd(pipe, prompt, negative_prompt, guidance, clip_skip, device):
    return family_named("sd15").encode_prompt(pipe, prompt, negative_prompt, guidance, clip_skip, device)


def encode_sdxl(pipe, prompt, negative_prompt, guidance, device):
    return family_named("sdxl").encode_prompt(pipe, prompt, negative_prompt, guidance, 1, device)

# The examples in the docstring of A1111's parse_prompt_attention (modules/prompt_parser.py), weights per fragment
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES)
def test_the_attention_parser_gives_a1111s_documented_weights(text, expected):
    parsed = parse_attention(text)
    assert [fragment for fragment, _ in parsed] == [fragment for fragment, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected], rel=1e-12)


@pytest.mark.parametrize("text, expected", [
    ("((word))", [("word", 1.21)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.21)]),
    ("a \\(b\\) c", [("a (b) c", 1.0)]),
    ("x (y: 1.3)", [("x ", 1.0), ("y", 1.3)]),  # spaces around the weight, as A1111's pattern allows
    ("(masterpiece:1.2 ), b", [("masterpiece", 1.2), (", b", 1.0)]),
    ("(a:..)", [("a:..", 1.1)]),  # not a number: text (A1111 would crash on it)
    ("", [("", 1.0)]),
])
def test_more_attention_cases(text, expected):
    parsed = parse_attention(text)
    assert [fragment for fragment, _ in parsed] == [fragment for fragment, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


def test_break_splits_the_prompt_into_chunk_groups():
    groups = split_at_breaks(parse_attention("a (red:1.3) circle BREAK on a blue background"))
    assert groups == [[("a ", 1.0), ("red", 1.3), (" circle", 1.0)], [("on a blue background", 1.0)]]
    # an empty chunk between two BREAKs, as A1111 makes
    assert split_at_breaks(parse_attention("a BREAK BREAK b")) == [[("a", 1.0)], [("", 1.0)], [("b", 1.0)]]
    assert split_at_breaks(parse_attention("BREAKING news")) == [[("BREAKING news", 1.0)]]  # a word of its own only


def test_lora_tags_are_taken_out_in_a1111s_forms():
    parsed = parse_prompt("a circle <lora:hexagon:0.8>, <lora:b> <lora:c:0.5:1> <lora:d:unet=0.3:te=1> "
                          "<hypernet:h:1>")
    assert parsed.loras == (LoraUse("hexagon", 0.8, 0.8), LoraUse("b", 1.0, 1.0), LoraUse("c", 0.5, 1.0),
                            LoraUse("d", 1.0, 0.3))
    assert parsed.ignored_tags == ("<hypernet:h:1>",)
    assert "<" not in parsed.text and parsed.plain == "a circle ,"
    assert parse_prompt("<lora:a:1> <lora:a:0.2>").loras == (LoraUse("a", 0.2, 0.2),)  # the last one counts
    with pytest.raises(InvalidRequest, match="'x' is not a weight"):
        parse_prompt("<lora:a:x>")
    with pytest.raises(InvalidRequest, match="not a LoRA setting"):
        parse_prompt("<lora:a:foo=1>")


@pytest.mark.parametrize("tag, message", [
    ("<lora:>", "<lora:>: name the LoRA, as in <lora:name:0.8>."),  # was read as words
    ("<LoRA:  >", "<LoRA:  >: name the LoRA"),
    ("<lora::0.5>", "<lora::0.5>: name the LoRA"),
    ("<lora:hexagon:>", "<lora:hexagon:>: a weight is missing after ':'"),
    ("<lora:hexagon:strong>", "<lora:hexagon:strong>: 'strong' is not a weight (write a number such as 0.8)."),
    ("<lora:hexagon:nan>", "<lora:hexagon:nan>: 'nan' is not a weight"),
])
def test_a_malformed_lora_tag_is_refused_naming_it(tag, message):
    with pytest.raises(InvalidRequest) as refused:
        parse_prompt(f"a circle {tag} on a blue background")
    assert len(refused.value.problems) == 1 and refused.value.problems[0].startswith(message)


@pytest.mark.parametrize("prompt, message", [
    ("a (red:1e308) circle", "(red:1e308): '1e308' is not a weight; write a number from -10 to 10, as in (red:1.3)."),
    ("a (red: INF ) circle", "(red: INF ): 'INF' is not a weight;"),
    ("a (red:-nan) circle", "(red:-nan): '-nan' is not a weight;"),
    ("a (red:1.2.3) circle", "(red:1.2.3): '1.2.3' is not a weight;"),  # A1111 crashes on it
    ("a (red:..) circle", "(red:..): '..' is not a weight;"),
    ("a (red:20) circle", "(red:20): the weight 20 is out of range; write a number from -10 to 10"),
    ("a (red:-10.5) circle", "(red:-10.5): the weight -10.5 is out of range"),
    ("a ((red:1.2) circle:1e5)", "((red:1.2) circle:1e5): '1e5' is not a weight"),  # the bracket it closes
    ("a (((((red:9))))) circle",
     "'red' is weighted 13.2 by its nested brackets, which multiply; keep it from -10 to 10."),
    ("a " + "(" * 30 + "red" + ")" * 30, "'red' is weighted 17.4"),
])
def test_an_emphasis_weight_that_is_not_a_sane_number_is_a_mistake(prompt, message):
    mistakes = prompt_mistakes(prompt)
    assert len(mistakes) == 1 and mistakes[0].startswith(message)


@pytest.mark.parametrize("prompt", [
    *(text for text, _ in A1111_EXAMPLES),
    "(cat:-1)", "(red:10) (blue:-10) ((((red:5))))", "(masterpiece:1.2 ), [blue] background BREAK ((sharp))",
    "16:90) ratio",  # no bracket to close: A1111 reads it as words
    "\\(red:20\\)",  # escaped: words
    "(aspect 16:9)",  # a weight of 9, as A1111 reads it
    "a circle <lora:hexagon:1e1> <hypernet:h:1e9>",  # tags are not emphasis (their checks are their own)
])
def test_sound_prompts_have_no_mistakes_and_parse_as_before(prompt):
    assert prompt_mistakes(prompt) == []


@pytest.mark.parametrize("field, text, message", [
    ("prompt", "a (red:1e308) circle", "In the prompt, (red:1e308): '1e308' is not a weight; write a number from -10"),
    ("negative_prompt", "(blue:inf)", "In the negative prompt, (blue:inf): 'inf' is not a weight;"),
    ("prompt", "a red circle <lora:>", "<lora:>: name the LoRA, as in <lora:name:0.8>."),
])
def test_text_to_image_and_inpainting_refuse_prompt_mistakes(engine, inpainter, field, text, message):
    """Every tab's request goes through these checks (Compare's cells and the Arena's contestants are text to image
    requests)."""
    from studio.tasks.inpainting import InpaintRequest

    prompts = {"prompt": "a red circle", field: text}
    for problems in (engine.problems(TextToImageRequest(**prompts)), inpainter.problems(InpaintRequest(**prompts))):
        assert list(problems) == [field] and problems[field].startswith(message)


def test_the_picker_writes_or_updates_a_tag():
    assert with_lora("a circle", LoraUse("hexagon", 0.8, 0.8)) == "a circle <lora:hexagon:0.8>"
    assert with_lora("a <lora:hexagon:1> circle", LoraUse("hexagon", 0.5, 0.5)) == "a <lora:hexagon:0.5> circle"
    assert with_lora("", LoraUse("x", 1, 1)) == "<lora:x:1>"


def test_plain_text_drops_the_syntax():
    assert plain_text("a (red:1.3) circle, [blue] background <lora:x:1> BREAK ((sharp))") == \
        "a red circle, blue background sharp"


@pytest.fixture(scope="module")
def sd_pipe():
    return StableDiffusionPipeline.from_pretrained(EMBEDDED, safety_checker=None)


def test_a_plain_prompt_encodes_as_diffusers_does(sd_pipe):
    with torch.inference_mode():
        embeds, negative = sd_pipe.encode_prompt("a red circle on a blue background", CPU, 1, True, "a square")
        ours = encode_sd(sd_pipe, "a red circle on a blue background", "a square", True, 1, CPU)
    assert torch.equal(ours["prompt_embeds"], embeds) and torch.equal(ours["negative_prompt_embeds"], negative)


def test_a_weight_scales_its_words_embedding_as_a1111_does(sd_pipe):
    """A1111's "Original" emphasis: the token's embedding times its weight, then the window scaled back to the
    mean it had."""
    with torch.inference_mode():
        plain = encode_sd(sd_pipe, "a red circle", "", False, 1, CPU)["prompt_embeds"]
        weighted = encode_sd(sd_pipe, "a (red:1.5) circle", "", False, 1, CPU)["prompt_embeds"]
    multipliers = torch.ones(plain.shape[1])
    multipliers[2] = 1.5  # <start> a red circle <end> ...
    expected = plain * multipliers.reshape(1, -1, 1)
    expected = expected * (plain.mean() / expected.mean())
    assert torch.allclose(weighted, expected, atol=1e-6)
    assert (weighted - plain)[0, 2].abs().max() > 0.5


def test_long_prompts_are_encoded_in_chunks_not_cut(sd_pipe):
    window = sd_pipe.tokenizer.model_max_length  # 32 for the embedded model (77 for SD)
    words = ", ".join(["a red circle on a blue background"] * 6)  # about 50 tokens
    with torch.inference_mode():
        long = encode_sd(sd_pipe, words, "", True, 1, CPU)
        changed_at_end = encode_sd(sd_pipe, words[: -len("background")] + "square", "", True, 1, CPU)
    assert long["prompt_embeds"].shape == (1, 2 * window, 64)
    assert long["negative_prompt_embeds"].shape == long["prompt_embeds"].shape  # padded to batch under CFG
    first, second = slice(0, window), slice(window, 2 * window)
    assert torch.equal(long["prompt_embeds"][:, first], changed_at_end["prompt_embeds"][:, first])
    assert not torch.equal(long["prompt_embeds"][:, second], changed_at_end["prompt_embeds"][:, second])


def test_windows_are_cut_as_a1111_cuts_them():
    """Full at the window's length, unless a comma is among its last 20 tokens: then right after the comma."""
    from studio.a1111.prompts import a1111_windows

    comma = 0
    tokens = [1] * 60 + [comma] + [2] * 30  # a comma 61st: 15 tokens before the end of a 75-token window
    windows = a1111_windows(tokens, [1.0] * len(tokens), 75, comma)
    assert [len(ids) for ids, _ in windows] == [61, 30] and windows[0][0][-1] == comma
    far = [1] * 40 + [comma] + [2] * 50  # a comma 35 tokens before the end: no backtrack
    assert [len(ids) for ids, _ in a1111_windows(far, [1.0] * 91, 75, comma)] == [75, 16]
    assert a1111_windows([], [], 75, comma) == [([], [])]


def test_an_early_full_stop_does_not_cut_a_window_short(sd_pipe):
    """A1111 cuts at the window's length (stepping back to a comma only near its end); a sentence end early on
    does not start a new window."""
    window = sd_pipe.tokenizer.model_max_length
    with torch.inference_mode():
        embeds = encode_sd(sd_pipe, "red circle. " + "blue " * 35, "", False, 1, CPU)["prompt_embeds"]
    assert embeds.shape[1] == 2 * window


def test_break_at_the_end_adds_no_window_and_a_negative_weight_is_not_a_break(sd_pipe):
    window = sd_pipe.tokenizer.model_max_length
    with torch.inference_mode():
        assert encode_sd(sd_pipe, "a red circle BREAK", "", False, 1, CPU)["prompt_embeds"].shape[1] == window
    assert split_at_breaks(parse_attention("a (cat:-1) dog")) == [[("a ", 1.0), ("cat", -1.0), (" dog", 1.0)]]


def test_break_starts_a_new_chunk(sd_pipe):
    window = sd_pipe.tokenizer.model_max_length
    with torch.inference_mode():
        broken = encode_sd(sd_pipe, "a red circle BREAK on a blue background", "", False, 1, CPU)["prompt_embeds"]
        alone = encode_sd(sd_pipe, "on a blue background", "", False, 1, CPU)["prompt_embeds"]
    assert broken.shape[1] == 2 * window
    assert torch.equal(broken[:, window:], alone)


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    folder = save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")
    return StableDiffusionXLPipeline.from_pretrained(folder)


def test_sdxl_plain_prompts_encode_as_diffusers_does(sdxl_pipe):
    with torch.inference_mode():
        expected = sdxl_pipe.encode_prompt("a red circle", device=CPU, num_images_per_prompt=1,
                                           do_classifier_free_guidance=True, negative_prompt="a blue square")
        ours = encode_sdxl(sdxl_pipe, "a red circle", "a blue square", True, CPU)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, tensor in zip(names, expected):
        assert torch.allclose(ours[name], tensor, atol=1e-5), name


def test_sdxl_long_prompts_use_both_encoders_chunk_by_chunk_and_pool_the_first_chunk(sdxl_pipe):
    window = sdxl_pipe.tokenizer.model_max_length
    words = ", ".join(["a red circle on a blue background"] * 6)
    changed_at_end = words[: -len("background")] + "square"
    with torch.inference_mode():
        long = encode_sdxl(sdxl_pipe, words, "", True, CPU)
        changed = encode_sdxl(sdxl_pipe, changed_at_end, "", True, CPU)
        first_chunk = encode_sdxl(sdxl_pipe, words, "", False, CPU)
    assert long["prompt_embeds"].shape == (1, 2 * window, 32 + 48)  # both encoders' widths side by side
    assert torch.equal(long["pooled_prompt_embeds"], changed["pooled_prompt_embeds"])  # the first chunk's
    assert not torch.equal(long["prompt_embeds"][:, window:], changed["prompt_embeds"][:, window:])
    assert torch.equal(first_chunk["pooled_prompt_embeds"], long["pooled_prompt_embeds"])
    # SDXL's "no negative prompt" is zeros (force_zeros_for_empty_prompt), the prompt's length
    assert torch.count_nonzero(long["negative_prompt_embeds"]) == 0
    assert long["negative_prompt_embeds"].shape == long["prompt_embeds"].shape


def test_the_engine_encodes_weights_and_keeps_the_prompt_as_typed(engine):
    typed = "a (red:1.3) circle, [blue] background BREAK " + ", ".join(["a red circle on a blue background"] * 5)
    result = engine.generate(TextToImageRequest(prompt=typed, seed=4, steps=4))
    assert result.images[0].parameters.split("\n")[0] == typed


def test_an_up_weighted_colour_moves_the_embedded_models_shape_towards_it(engine):
    """"a red yellow circle" comes out orange. Up-weighting yellow rather than red must make it yellower (more
    green in the shape's pixels, read with the oracle's shape mask) for most seeds; weights that did nothing would
    split the seeds about evenly. bench/prompt_weights.py measures the same on other seeds."""
    from studio.embedded.oracle import background_colour, shape_mask

    preset = engine.presets.get("embedded")

    def green(prompt: str, seed: int) -> float:
        image = engine.generate(TextToImageRequest.preset_defaults(preset, prompt, seed)).images[0].image
        pixels = np.asarray(image, dtype=np.float32)
        return float(pixels[shape_mask(pixels, background_colour(pixels))][:, 1].mean())

    seeds = range(3000, 3012)
    asked_way = sum(green("a red (yellow:1.5) circle on a white background", seed)
                    > green("a (red:1.5) yellow circle on a white background", seed) for seed in seeds)
    assert asked_way >= 10, f"yellow-up greener than red-up in only {asked_way}/12 seeds"
