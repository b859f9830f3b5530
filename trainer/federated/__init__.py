"""Seed 003: a shared encoder trained across nodes that keep their data private (Flower).

``kd train federated`` (:mod:`trainer.federated.run`); the protocol and formula are in
``docs/federated.md``.
"""
