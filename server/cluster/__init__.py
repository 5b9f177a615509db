"""Scale-out on Ray Serve: one FastAPI ingress (the unchanged app) over N engine replicas.

`store.py` the single-writer adapter store as a Ray actor and its client; `replica.py` the engine
replica deployment (one `Engine` each, adapters multiplexed by content id); `client.py` the
ingress's view of the replicas, mirroring the `Engine` methods the app calls; `ingress.py` builds the
Serve application; `launch.py` is `loraswap serve --replicas N`. Imports Ray; nothing else in the
server does, so the single-process server never needs it.
"""
