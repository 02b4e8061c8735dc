from hypothesis import given
from hypothesis import strategies as st
from twisted.protocols import amp

from bai_agent.protocol.arguments import MAX_VALUE_LENGTH, Big, BigJson, BigUnicode, Json


class BigCommand(amp.Command):
    commandName = b"BigCommand"
    arguments = [
        (b"data", Big()),
        (b"text", BigUnicode()),
        (b"doc", BigJson()),
        (b"small", Json()),
        (b"maybe", Big(optional=True)),
    ]


def roundtrip(**objects):
    box = amp._objectsToStrings(objects, BigCommand.arguments, amp.AmpBox(), None)
    # Every value must fit AMP's limit and the box must survive the wire encoding.
    assert all(len(value) <= MAX_VALUE_LENGTH for value in box.values())
    wire = box.serialize()
    parsed = amp.AmpBox()
    parser = amp.BinaryBoxProtocol(lambda b: parsed.update(b))
    parser.boxReceiver = type("R", (), {"ampBoxReceived": lambda self, b: parsed.update(b)})()
    parser.dataReceived(wire)
    return box, amp._stringsToObjects(parsed, BigCommand.arguments, None)


def test_big_value_is_split_into_numbered_chunks():
    data = b"x" * (2 * MAX_VALUE_LENGTH + 10)
    box, parsed = roundtrip(data=data, text="", doc=None, small=1)
    assert box[b"data"] == b"x" * MAX_VALUE_LENGTH
    assert len(box[b"data.1"]) == MAX_VALUE_LENGTH
    assert len(box[b"data.2"]) == 10
    assert b"data.3" not in box
    assert parsed["data"] == data


def test_empty_big_value_is_the_key_alone():
    box, parsed = roundtrip(data=b"", text="", doc="", small=[])
    assert box[b"data"] == b""
    assert b"data.1" not in box
    assert parsed["data"] == b"" and parsed["text"] == ""


def test_optional_big_value_may_be_absent():
    box, parsed = roundtrip(data=b"1", text="t", doc={}, small={}, maybe=None)
    assert b"maybe" not in box
    assert parsed["maybe"] is None


@given(
    data=st.binary(max_size=3 * MAX_VALUE_LENGTH),
    text=st.text(max_size=40000),
    doc=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=50),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
        max_leaves=20,
    ),
)
def test_big_arguments_roundtrip(data, text, doc):
    _, parsed = roundtrip(data=data, text=text, doc=doc, small=doc)
    assert parsed["data"] == data
    assert parsed["text"] == text
    assert parsed["doc"] == doc
    assert parsed["small"] == doc


def test_json_rejects_nan():
    import pytest

    with pytest.raises(ValueError):
        Json().fromString(b'{"cpu": NaN}')
    with pytest.raises(ValueError):
        Json().toString(float("nan"))
