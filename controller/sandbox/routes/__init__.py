"""The sandbox gateway's routes, one module per gateway area; each area is a
``GatewayBase`` subclass and ``controller.sandbox.app.SandboxGateway`` combines them."""
