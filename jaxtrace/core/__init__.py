"""The pure-JAX core: gate sites, models, packing, the objective, metrics and the PGB-CT update.

Nothing here reads or writes files or prints. Every function is a function of arrays and typed records
(`jaxtrace.core.records`); the host side (batching, devices, loops) is `jaxtrace.engine`.

Axis letters, used in every shape comment of the package (one letter, one axis):

| letter | axis                                   | letter | axis                                  |
|--------|----------------------------------------|--------|---------------------------------------|
| N      | pairs of a task                        | L      | layers                                |
| B      | pairs of a batch (per data group)      | C      | components per layer (gate width)     |
| G      | data groups (one per `data` device)    | D      | model width                           |
| R      | runs optimised together (a λ sweep)    | F      | MLP width                             |
| M      | masks evaluated together               | H      | query heads                           |
| T      | tokens of a row (prompt + continuation)| K      | key/value heads                       |
| P      | prompt tokens                          | Dh     | head width                            |
| Y      | targets of a pair                      | V      | vocabulary                            |
| U      | tokens of a target                     | W      | packed rows                           |
| X      | shared-prefix tokens of a pair         | S      | tokens of a packed row                |
| E      | prefix (memory) slots of a packed row  | Q      | logit positions of a packed batch     |
| O      | residual writers (input, heads, MLPs)  |        |                                       |
"""
