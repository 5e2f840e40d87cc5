"""Cape workers: appliance, MPC engine, jobs, reference coordinator and broker, client."""
