from conftest import ROOT

from studio.models.vocabulary import Vocabulary, load_vocabulary, unknown_words_warning

VOCABULARY = Vocabulary({"shapes": ("circle", "star"), "colours": ("red", "grey", "gray"),
                         "positions": ("at the top left", "in the middle"), "other": ("a", "on")})


def test_unknown_words_are_named_once_in_order():
    assert VOCABULARY.unknown_words("a photo of a dog, a dog on a red star") == ["photo", "of", "dog"]
    assert VOCABULARY.unknown_words("A Red Circle at the Top Left") == []


def test_prompt_syntax_is_not_words():
    prompt = "(red:1.2) circle BREAK a [star|circle] AND a grey star <lora:shapes_v2:0.8>"
    assert VOCABULARY.unknown_words(prompt) == []
    assert VOCABULARY.unknown_words("a red circle and a star") == ["and"]  # lower case "and" is a word


def test_the_warning_names_the_words_and_what_the_model_knows():
    warning = unknown_words_warning(VOCABULARY, "a dog", "The model")
    assert warning.startswith("The model has never seen “dog”, so it does not steer it. It knows shapes: circle")
    assert unknown_words_warning(VOCABULARY, "a red star", "The model") is None
    assert unknown_words_warning(None, "a dog", "A Hub model") is None  # a model that does not say, says nothing


def test_the_embedded_models_vocabulary_is_what_its_captions_use():
    from studio.embedded import scenes

    vocabulary = load_vocabulary(ROOT / "models" / "embedded-sd")
    assert vocabulary.groups == {kind: tuple(words) for kind, words in scenes.known_words().items()}
    assert {"grey", "gray"} <= set(vocabulary.groups["backgrounds"])
