"""One module per command of ``python -m miniattn``, each with main(argv)."""
