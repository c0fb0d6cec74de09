"""The ai service: the ``ai.*`` tasks (summarize, chat, translate, action items) run on edge LLM
nodes through the `EdgeBridge` it owns, tokens streamed to clients as ``progress`` deltas, under an
adaptive (AIMD) concurrency limit; a meeting's chat summarised when it ends and posted on
``meeting.<id>``. Speech recognition and emotion detection fail saying no model serves them."""
