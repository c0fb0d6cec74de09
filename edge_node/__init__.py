"""The reference edge LLM node (an app on top of the bus): `node` serves StackFlow units over a model
(`EdgeNode`, `EdgeUnits`), `models` holds the models (`EchoModel`, `LlamaModel`) and prompt templates.
``meetmesh edge-node`` runs one."""
