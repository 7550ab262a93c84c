"""Scale-out on Ray Serve: the OpenAI-compatible ingress over N engine replicas of the base, routed by adapter
affinity (`app`, `gateway`, `replica`, `router`, `launch`; the pure parts in `state`). Importing it imports Ray
(`pip install 'deltafleet[ray]'`); elsewhere only `bench.cluster` and the `--ray` options of the commands do."""
