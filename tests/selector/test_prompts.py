import pytest

from fedbiscuit.selector.prompts import TEMPLATES, Template, TemplateError, answer_token_ids


def test_named_templates_parse_and_render():
    for name in TEMPLATES:
        t = Template.parse(name)
        text = t.render("PROMPT", "AAA", "BBB")
        assert text.index("PROMPT") < text.index("AAA") < text.index("BBB")
        assert text.endswith("Answer:")


def test_custom_template_and_errors():
    t = Template.parse("Q: {prompt}\n1: {response_a}\n2: {response_b}\nBest:")
    assert t.pieces == ("Q: ", "\n1: ", "\n2: ", "\nBest:")
    with pytest.raises(TemplateError, match="response_b"):
        Template.parse("Q: {prompt} {response_a}")
    with pytest.raises(TemplateError, match="in that order"):
        Template.parse("{response_a} {prompt} {response_b}")


def test_answer_tokens(tiny):
    _, tok = tiny
    a, b = answer_token_ids(tok)
    assert tok.decode([a]) == " A" and tok.decode([b]) == " B"
    with pytest.raises(TemplateError, match="one token per answer"):
        answer_token_ids(tok, " Alpha", " B")
    with pytest.raises(TemplateError, match="same token"):
        answer_token_ids(tok, " A", " A")
