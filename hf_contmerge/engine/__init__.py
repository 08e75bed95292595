"""The continual loop: a stream's steps (``run``), each planned (``plan``) then executed (``step``, ``executor``).

The engine knows order, step counter, state, devices and passes; it knows no method (``methods/``)
and neither evaluation nor publishing, which attach as step hooks (``hooks``).
"""
