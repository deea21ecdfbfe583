"""The development kit: what scripts, benchmarks and tests share and a user's run does not need
(the default model, the synthetic world and its base, the server launcher, test model builders, the
simulated ComfyUI server, one ComfyUI bootstrap). Imported by plain ``import devkit.<module>`` with the
repository root on ``sys.path``; the shipped core (``productscene/``) never imports it."""
