"""profusion-rt on a Ray cluster with Ray Serve (the ``ray`` extra; docs/scale-out.md).

* :mod:`~profusion_rt.serve.ray.spec`: the model, scaling and resources as plain data, and the Ray Serve
  YAML (no ray import: ``profusion-rt serve --engine ray --print-config`` works without a cluster);
* :mod:`~profusion_rt.serve.ray.generator`: the Generator deployment (one runtime per replica, subject
  deltas multiplexed by subject id, ``@serve.batch`` per subject);
* :mod:`~profusion_rt.serve.ray.ingress`: the HTTP ingress serving the API of ``profusion-rt serve``;
* :mod:`~profusion_rt.serve.ray.customize`: ``customize=true`` as a Ray task with its own resources;
* :mod:`~profusion_rt.serve.ray.app`: the application builder (``serve deploy``), :func:`start`, :func:`stop`.

Only the modules below this package import ``ray``; importing this package itself does not.
"""
