"""emoq.labels: fixed id orders, aliases, free-text mapping and protocol label sets."""

from __future__ import annotations

import pytest

from emoq.labels import LABEL_SETS, LabelSet, UnknownLabelError, get_label_set


def test_registered_sets_and_their_order():
    assert set(LABEL_SETS) >= {"meld7", "meld_sentiment3", "iemocap4", "iemocap_patamia4"}
    assert get_label_set("meld7").labels == ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
    assert get_label_set("meld_sentiment3").labels == ("neutral", "positive", "negative")
    assert get_label_set("iemocap4").labels == ("neutral", "happy", "angry", "sad")
    assert get_label_set("iemocap_patamia4").labels == ("angry", "excited", "neutral", "sad")
    meld = get_label_set("meld7")
    assert meld.id2label == {0: "neutral", 1: "surprise", 2: "fear", 3: "sadness", 4: "joy", 5: "disgust", 6: "anger"}
    assert meld.label2id["anger"] == 6 and meld.num_labels == 7 and len(meld) == 7
    assert meld.prompt_options() == "neutral, surprise, fear, sadness, joy, disgust, anger"
    assert get_label_set(meld) is meld


def test_unknown_label_set_names_the_choices():
    with pytest.raises(KeyError) as err:
        get_label_set("meld8")
    assert "meld8" in str(err.value) and "meld7" in str(err.value)


def test_normalize_raw_codes_and_case():
    meld = get_label_set("meld7")
    assert meld.normalize("Joy") == "joy"
    assert meld.normalize("  ANGER ") == "anger"
    assert meld.normalize("happy") == "joy"
    iemo = get_label_set("iemocap4")
    assert iemo.normalize("exc") == "happy"  # excited merges into happy
    assert iemo.normalize("hap") == "happy"
    assert iemo.normalize("neu") == "neutral" and iemo.normalize("ang") == "angry"
    pat = get_label_set("iemocap_patamia4")
    assert pat.normalize("exc") == "excited"
    with pytest.raises(UnknownLabelError):
        pat.normalize("hap")  # not part of the Patamia protocol: never merged silently
    assert meld.encode("sad") == 3 and meld.decode(3) == "sadness"


def test_unknown_label_error_is_a_value_error_naming_value_and_labels():
    meld = get_label_set("meld7")
    with pytest.raises(ValueError) as err:
        meld.normalize("frustrated-ish")
    assert isinstance(err.value, UnknownLabelError)
    assert "'frustrated-ish'" in str(err.value) and "neutral, surprise, fear" in str(err.value)
    with pytest.raises(UnknownLabelError):
        meld.normalize(None)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Joy", "joy"),
        ("happy", "joy"),
        ("joyful", "joy"),
        ("The emotion is anger.", "anger"),
        ("angry", "anger"),
        ("  Sadness!  ", "sadness"),
        ("The speaker sounds sad and unhappy.", "sadness"),  # two aliases of the same label
        ("Emotion: SURPRISE", "surprise"),
        ("neutral", "neutral"),
        ("Disgusted.", "disgust"),
        ("scared", "fear"),
        ("I think it's fear", "fear"),
        ("", None),
        (None, None),
        ("banana", None),
        ("joy or anger", None),  # ambiguous: counted as unmappable, not guessed
        ("neutral, surprise, fear, sadness, joy, disgust, anger", None),
        ("madeup", None),  # 'mad' inside a word is not a mention
    ],
)
def test_parse_free_text_meld(text, expected):
    assert get_label_set("meld7").parse_free_text(text) == expected


def test_parse_free_text_other_sets():
    iemo = get_label_set("iemocap4")
    assert iemo.parse_free_text("Excited!") == "happy"
    assert iemo.parse_free_text("anger") == "angry"
    assert get_label_set("meld_sentiment3").parse_free_text("Positive.") == "positive"
    assert get_label_set("iemocap_patamia4").parse_free_text("The answer is: excited") == "excited"


def test_custom_label_set_validation_and_round_trip():
    ls = LabelSet("mine", ("calm", "tense"), aliases={"Relaxed": "calm"}, description="two")
    assert ls.normalize("relaxed") == "calm"
    assert LabelSet.from_dict(ls.to_dict()) == ls
    with pytest.raises(ValueError):
        LabelSet("bad", ("a", "a"))
    with pytest.raises(ValueError):
        LabelSet("bad", ("a", "b"), aliases={"x": "c"})
    hash(ls)  # frozen and hashable
    with pytest.raises(AttributeError):
        ls.name = "other"
