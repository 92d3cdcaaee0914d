"""The toy world: sources, renderers, tokenizer, bases, classifier judges, style set, reproduction.

Production code never imports this package; it plugs in through judges and stage inputs.
"""
