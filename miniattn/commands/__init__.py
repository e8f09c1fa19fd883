"""One module per command of ``python -m miniattn``, each with main(argv)."""


def help_description(docstring, *, paragraphs=1):
    """Return the first paragraphs of a module docstring as help text, without reST's `` marks."""
    text = "\n\n".join(docstring.strip().split("\n\n")[:paragraphs])
    return text.replace("``", "")
