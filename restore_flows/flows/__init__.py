"""Prefect glue: the flows (``restore``), their progress artifacts (``progress``), the deployments
(``serving``) and the local Prefect server the project runs (``server``). Thin by design: everything
they do is done by :mod:`restore_flows.execution` and :mod:`restore_flows.scheduling`."""
