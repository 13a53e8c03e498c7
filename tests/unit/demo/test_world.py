"""The demo world: deterministic from its seed, and every answer true of the scene it asks about."""

from __future__ import annotations

import numpy as np

from uniadapter_serve.model.demo.world import COLORS, NUMBERS, SHAPES, World


def test_seeded_and_reproducible():
    a, b = World(seed=3), World(seed=3)
    assert a.scene(10) == b.scene(10) and a.scene(10) != World(seed=4).scene(10)
    assert np.array_equal(np.asarray(a.render(a.scene(10))), np.asarray(b.render(b.scene(10))))
    assert a.clip(5).caption() == b.clip(5).caption()


def test_answers_are_true_of_the_scene():
    world = World(seed=1)
    for i in range(200):
        scene = world.scene(i)
        by_shape = {s.shape: s for s in scene.shapes}
        for question, answer in scene.questions():
            words = question.split()
            if question.startswith("how many"):
                assert answer == NUMBERS[len(scene.shapes)]
            elif question.startswith("what colour is the"):
                assert by_shape[words[-1]].color == answer
            elif question.startswith("what shape is"):
                assert [s.shape for s in scene.shapes if s.color == words[-1]] == [answer]
            elif question.startswith("is there a"):
                assert (words[3] in {s.color for s in scene.shapes}) == (answer == "yes")
            elif question.endswith("left or right"):
                assert by_shape[words[2]].horizontal == answer


def test_pixels_show_the_scene():
    world = World(seed=2, image_size=64)
    scene = world.scene(0, num_shapes=1)
    shape = scene.shapes[0]
    image = np.asarray(world.render(scene)).astype(int)
    cx, cy = int(shape.x * 64), int(shape.y * 64)
    assert np.abs(image[cy, cx] - np.array(COLORS[shape.color])).max() < 30  # the shape's colour at its centre
    assert shape.shape in SHAPES


def test_clips_move_or_change():
    world = World(seed=5)
    for i in range(40):
        clip = world.clip(i)
        first, last = clip.frames[0].shapes[0], clip.frames[-1].shapes[0]
        if clip.event == "move":
            dx, dy = last.x - first.x, last.y - first.y
            moved = {"left": dx < -0.3, "right": dx > 0.3, "up": dy < -0.3, "down": dy > 0.3}
            assert moved[str(clip.direction)]
        else:
            assert first.color != last.color and last.color == clip.new_color
