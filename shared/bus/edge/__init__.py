"""The edge link: the bridge pool (``pool``) that lends tasks to edge devices over the ZeroMQ ROUTER
link (``router``) with CURVE keys and the ZAP authenticator (``keys``), and the StackFlow wire schema
(``stackflow``) with its TCP transport (``stackflow_tcp``)."""
