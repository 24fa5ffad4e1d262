"""The pool doctor: the seed's production checklist evaluated against what poolwatch observes.

``model`` holds the verdict types, ``checks`` one small rule per checklist item (pure functions of
observations and thresholds), ``report`` renders the verdicts for a terminal, JSON and HTML.
"""
