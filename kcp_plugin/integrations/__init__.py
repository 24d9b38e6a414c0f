"""Thin adapters of the core API to host libraries (mmseg/mmengine, timm, NNI).

Each submodule imports its host library lazily (only when it is itself imported), so
``import kcp_plugin`` keeps needing only torch and torch-pruning.
"""
