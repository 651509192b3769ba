"""MaskSAMSlicer's plain classes (Slicer camelCase).

The logic modules (``process``, ``volumeIO``, ``segmentationLogic``, ``trainingLogic``,
``modelRegistry``, ``install``) use MRML and ``slicer.util`` but not qt, the application object
or ScriptedLoadableModule, so they run against ``slicer-core`` outside the Slicer app.
``widget`` (qt) and ``parameters`` (parameterNodeWrapper) only load inside Slicer.

Nothing is imported here on purpose: importing the package costs nothing and needs no torch.
"""
