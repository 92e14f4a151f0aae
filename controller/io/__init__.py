"""Local I/O finops does safely: bounded reads of user-named files (``safefile``), blocking
work off the event loop (``blocking``), atomic private secret files (``secretfile``), secret
references (``secretref``), and which gateway a command talks to (``target``)."""
