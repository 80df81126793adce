"""The mathematics: Hessian-vector products and Krylov solvers, losses, models, optimizers."""
