"""What runs inside the sandbox, in a kernel or beside it: standard library only, importing
nothing of autocoder (the sandbox does not see the package). The server sends these sources
whole: `asserts.py` and `output_cap.py` as a kernel's exec_lines, `supervisor.py` with
`python -I -S -c`, `zygote.py` through a pipe into the zygote's bwrap."""
