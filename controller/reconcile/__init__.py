"""Reconciliation: observe the gateway (``observe``), decide with the pure planner (``decide``
gathers finops' memory and calls ``policies.planner``), act (``apply``, through the one
``pipeline``), and the reconcilers and checks built on that loop (``rebalancer``, ``holds``,
``approval``, ``status``)."""
