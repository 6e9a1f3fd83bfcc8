"""The user-facing commands built on the library: `ofsdpo eval` (`eval`), `ofsdpo demo` (`demo`) and
`ofsdpo experiment` (`experiment`, with its aggregate, tables and plots in `experiment_report`).

The library (trainer, continual, scoring, …) never imports from here, and the imports here run one way:
experiment → experiment_report, eval and demo; experiment_report, eval and demo import none of the others.
Their configs live in `ofsdpo.config`; nothing is imported eagerly.
"""
