"""The Flower engine: the federated round loop as a Flower ServerApp, SelectorClient as a ClientApp.

server_app.py  the ServerApp and its transport over Flower's Grid (node discovery, messages, timeouts)
client_app.py  the ClientApp (node config -> its own data; train, score, identify, echo)
messages.py    the RecordDicts both sides exchange, and their size on the wire
inprocess.py   an in-process Grid that runs both apps in one process (tests, quick runs)
simulation.py  Flower's simulation runtime (Ray): both apps with N virtual SuperNodes (`flwr run`)
deploy.py      the Flower app folder, certificates, and the SuperLink / SuperNode commands
"""
